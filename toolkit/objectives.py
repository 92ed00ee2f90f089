"""GAN objectives: one registry, name -> Objective.

Every loss is a stateless function of the discriminator's raw outputs `v` (one score per
sample) and returns per-sample values; the trainer takes means. Per-sample values keep the
losses usable with per-sample gradients (Opacus) and let tests take exact expectations
under discrete distributions.

f-GAN (Nowozin et al. 2016, Table 2): D's output passes through the output activation
g_f, giving T = g_f(v); D maximises E_P[T] - E_Q[f*(T)], a lower bound of D_f(P || Q) that
is tight at T = f'(p/q). The products f*(g_f(v)) are written in closed forms that do not
overflow. The generator's default loss is the non-saturating -E_Q[T] (the paper's practical
choice, section 3.2); `minimax=True` gives the saddle-point form, G minimising -E_Q[f*(T)].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Objective:
    name: str
    # v -> T: the f-GAN output activation g_f; identity for the other losses.
    activation: Callable[[Tensor], Tensor]
    # v -> f*(g_f(v)) for f-GANs (None otherwise).
    conjugate: Optional[Callable[[Tensor], Tensor]]
    # T above this value means "D says real": f'(1), where the optimal T of an f-GAN sits
    # when P = Q; 0 for logits and critics; midpoint of the targets for least squares.
    threshold: float
    # bce and lsgan accept per-sample targets (label smoothing, soft labels).
    uses_targets: bool = False
    clip_weights: bool = False
    gradient_penalty: bool = False
    # D steps per G step when --n-critic is 0 (WGAN's critic is trained to optimality first).
    default_n_critic: int = 1
    # D's raw output v -> its estimate of log p_data / p_g at D's optimum, where there is a
    # closed form (what rejection sampling needs without calibration); None otherwise.
    density_ratio_logit: Optional[Callable[[Tensor], Tensor]] = None
    _d_real: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    _d_fake: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    _g_nonsat: Optional[Callable[[Tensor], Tensor]] = None
    _g_minimax: Optional[Callable[[Tensor], Tensor]] = None

    def d_real(self, v: Tensor, target: Optional[Tensor] = None) -> Tensor:
        """Per-sample discriminator loss on real data."""
        if self.conjugate is not None:
            return -self.activation(v)
        return self._d_real(v, _target(v, target, 1.0))

    def d_fake(self, v: Tensor, target: Optional[Tensor] = None) -> Tensor:
        """Per-sample discriminator loss on generated data."""
        if self.conjugate is not None:
            return self.conjugate(v)
        return self._d_fake(v, _target(v, target, 0.0))

    def g_loss(self, v: Tensor, minimax: bool = False) -> Tensor:
        """Per-sample generator loss on D's scores of generated data."""
        if self.conjugate is not None:
            # minimax: G minimises the part of D's objective it controls, -E_Q[f*(T)].
            return -self.conjugate(v) if minimax else -self.activation(v)
        return (self._g_minimax if minimax else self._g_nonsat)(v)

    def says_real(self, v: Tensor) -> Tensor:
        return self.activation(v) > self.threshold


def _target(v: Tensor, target: Optional[Tensor], default: float) -> Tensor:
    if target is None:
        return torch.full_like(v, default)
    return target.to(v.dtype).expand_as(v)


def _identity(v: Tensor) -> Tensor:
    return v


def _fgan(name: str, activation, conjugate, threshold: float, density_ratio_logit=None) -> Objective:
    return Objective(name=name, activation=activation, conjugate=conjugate, threshold=threshold,
                     density_ratio_logit=density_ratio_logit)


OBJECTIVES: dict[str, Objective] = {
    # Non-saturating vanilla GAN (Goodfellow et al. 2014): D outputs logits.
    "bce": Objective(
        name="bce", activation=_identity, conjugate=None, threshold=0.0, uses_targets=True,
        density_ratio_logit=_identity,
        _d_real=lambda v, t: F.binary_cross_entropy_with_logits(v, t, reduction="none"),
        _d_fake=lambda v, t: F.binary_cross_entropy_with_logits(v, t, reduction="none"),
        _g_nonsat=lambda v: F.softplus(-v),   # -log D(G(z))
        _g_minimax=lambda v: -F.softplus(v),  # log(1 - D(G(z)))
    ),
    # f-GANs. Pairs (g_f(v), f*(g_f(v))), threshold f'(1):
    # KL        f(u)=u log u          g_f=v              f*(t)=exp(t-1)
    "kl": _fgan("kl", _identity, lambda v: torch.exp(v - 1.0), 1.0,
                lambda v: v - 1.0),  # T = v = f'(u) = 1 + log u
    # reverse KL f(u)=-log u          g_f=-exp(-v)       f*(t)=-1-log(-t)  -> v - 1
    "rkl": _fgan("rkl", lambda v: -torch.exp(-v), lambda v: v - 1.0, -1.0,
                 _identity),  # T = -exp(-v) = f'(u) = -1 / u
    # JS        f(u)=-(u+1)log((1+u)/2)+u log u  g_f=log2-softplus(-v)  f*(t)=-log(2-e^t)
    #           -> softplus(v) - log 2
    "js": _fgan("js", lambda v: LOG2 - F.softplus(-v), lambda v: F.softplus(v) - LOG2, 0.0,
                _identity),  # T = log(2 sigmoid(v)) = f'(u) = log(2u / (1 + u))
    # Pearson chi2 f(u)=(u-1)^2       g_f=v              f*(t)=t^2/4+t
    "pearson": _fgan("pearson", _identity, lambda v: 0.25 * v * v + v, 0.0),
    # squared Hellinger f(u)=(sqrt u-1)^2  g_f=1-exp(-v)  f*(t)=t/(1-t)  -> exp(v) - 1
    "hellinger": _fgan("hellinger", lambda v: 1.0 - torch.exp(-v), lambda v: torch.expm1(v), 0.0,
                       lambda v: 2.0 * v),  # T = 1 - exp(-v) = f'(u) = 1 - u^(-1/2)
    # Wasserstein critic (Arjovsky et al. 2017) with weight clipping after each D step.
    "wgan": Objective(
        name="wgan", activation=_identity, conjugate=None, threshold=0.0, clip_weights=True,
        default_n_critic=5,
        _d_real=lambda v, t: -v, _d_fake=lambda v, t: v, _g_nonsat=lambda v: -v,
        _g_minimax=lambda v: -v,
    ),
    # WGAN-GP (Gulrajani et al. 2017): the same critic loss plus a gradient penalty.
    "wgan-gp": Objective(
        name="wgan-gp", activation=_identity, conjugate=None, threshold=0.0,
        gradient_penalty=True, default_n_critic=5,
        _d_real=lambda v, t: -v, _d_fake=lambda v, t: v, _g_nonsat=lambda v: -v,
        _g_minimax=lambda v: -v,
    ),
    # Hinge loss (Lim & Ye 2017; Miyato et al. 2018).
    "hinge": Objective(
        name="hinge", activation=_identity, conjugate=None, threshold=0.0,
        _d_real=lambda v, t: F.relu(1.0 - v), _d_fake=lambda v, t: F.relu(1.0 + v),
        _g_nonsat=lambda v: -v, _g_minimax=lambda v: -v,
    ),
    # Least squares GAN (Mao et al. 2017), targets a=0 (fake), b=c=1 (real).
    "lsgan": Objective(
        name="lsgan", activation=_identity, conjugate=None, threshold=0.5, uses_targets=True,
        _d_real=lambda v, t: 0.5 * (v - t) ** 2, _d_fake=lambda v, t: 0.5 * (v - t) ** 2,
        _g_nonsat=lambda v: 0.5 * (v - 1.0) ** 2, _g_minimax=lambda v: -0.5 * v ** 2,
    ),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown loss '{name}' (choose from {', '.join(OBJECTIVES)})") from None


def gradient_penalty(D: nn.Module, real: Tensor, fake: Tensor, labels: Optional[Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sample (||grad_x D(x_hat)||_2 - 1)^2 at random interpolates of real and fake.

    Real and fake batches may differ in size (Poisson sampling); the first min(n, m) of each
    are paired.
    """
    n = min(real.shape[0], fake.shape[0])
    real, fake = real[:n], fake[:n].detach()
    eps = torch.rand((n,) + (1,) * (real.dim() - 1), device=real.device, generator=generator)
    x_hat = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    scores = D(x_hat, labels[:n]) if labels is not None else D(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0) ** 2


@torch.no_grad()
def clip_weights(D: nn.Module, clip_value: float) -> None:
    """WGAN's Lipschitz constraint: every parameter of D into [-c, c]."""
    for p in D.parameters():
        p.clamp_(-clip_value, clip_value)
