"""The discriminator step and the generator step, as free functions.

Both take a `StepContext`: what a step needs besides the network being updated (G and its
prior, the objective, the config). Keeping the steps free functions lets a mode hand in a
wrapped (private) discriminator and its own D step without the loop knowing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gankit.config import Config
from gankit.latent import MixturePrior, sample_labels
from gankit.objectives import Objective, clip_weights, gradient_penalty


@dataclass(frozen=True)
class StepContext:
    G: nn.Module
    prior: nn.Module
    objective: Objective
    config: Config
    num_classes: int   # 0 when the model is unconditional
    device: torch.device
    # D's passes over G's fakes run inside this: the dp mode may add their gradient exactly,
    # outside the clipping and noise (they read no private data).
    public_pass: Callable[[], ContextManager] = nullcontext
    # --fake-labels data: the training labels' class counts, which the fakes' labels follow
    # (a client that holds two classes then never asks its D about the other eight).
    label_counts: Optional[Tensor] = None

    def fake_labels(self, n: int) -> Optional[Tensor]:
        if not self.num_classes:
            return None
        if self.label_counts is not None:
            return torch.multinomial(self.label_counts, n, replacement=True)
        return sample_labels(n, self.num_classes, device=self.device)


def sample_targets(n: int, low: float, high: float, like: Tensor) -> Tensor:
    """Per-sample BCE/LSGAN targets: a constant, or uniform in [low, high] (soft labels)."""
    if low == high:
        return torch.full((n,), low, device=like.device, dtype=like.dtype)
    return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(low, high)


def discriminator_step(ctx: StepContext, D: nn.Module, d_opt: torch.optim.Optimizer,
                       real: Tensor, labels: Optional[Tensor], measure: bool = False) -> dict:
    """One update of D on a real batch and as many fresh fakes. `measure` adds the gradient
    norm (an extra pass over the parameters, so only on logging steps)."""
    o, objective = ctx.config.objective, ctx.objective
    n = real.shape[0]
    fake_labels = ctx.fake_labels(n) if labels is not None else None
    with torch.no_grad():
        fake = ctx.G(ctx.prior.sample(n, device=real.device), fake_labels)
    # The auxiliary classifier learns classes from real images only: fakes with wrong labels
    # would teach it wrong classes while G is still poor.
    aux = ctx.config.objective.aux_classifier if labels is not None else 0.0
    if aux:
        v_real, class_logits = D(real, labels, classes=True)
    else:
        v_real = D(real, labels)
    with ctx.public_pass():
        v_fake = D(fake, fake_labels)
    real_target = fake_target = None
    if objective.uses_targets:
        low, high = ((1 - o.label_smoothing,) * 2 if o.label_smoothing
                     else (o.real_label_min, o.real_label_max))
        real_target = sample_targets(n, low, high, v_real)
        fake_target = sample_targets(n, o.fake_label_min, o.fake_label_max, v_fake)
    loss = objective.d_real(v_real, real_target).mean() + objective.d_fake(v_fake, fake_target).mean()
    class_stats = {}
    if aux:
        class_loss = F.cross_entropy(class_logits, labels)
        loss = loss + aux * class_loss
        class_stats = {"d_class_loss": class_loss.detach(),
                       "d_class_acc": (class_logits.detach().argmax(1) == labels).float().mean()}
    if objective.gradient_penalty:
        loss = loss + o.gp_weight * gradient_penalty(D, real, fake, labels).mean()
    d_opt.zero_grad(set_to_none=True)
    loss.backward()
    d_opt.step()
    # Read after the step: a private optimizer has replaced the gradient by its clipped,
    # noised version by then, so the logged norm stays private; Adam leaves it as it was.
    stats = {"d_grad_norm": grad_norm(D)} if measure else {}
    if objective.clip_weights:
        clip_weights(D, o.clip_value)
    with torch.no_grad():
        return {
            **stats,
            **class_stats,
            "d_loss": loss.detach(),
            "d_real": objective.activation(v_real).mean(),
            "d_fake": objective.activation(v_fake).mean(),
            "d_acc_real": objective.says_real(v_real).float().mean(),
            "d_acc_fake": (~objective.says_real(v_fake)).float().mean(),
        }


def generator_step(ctx: StepContext, D: nn.Module, g_opt: torch.optim.Optimizer,
                   d_opt: torch.optim.Optimizer, n: int, measure: bool = False) -> dict:
    """One update of G through D's scores of n fresh fakes.

    Also returns `d_acc_g_fakes`, D's accuracy on these fakes before G learns from them:
    D has never seen them, and they depend on no real data, so it is a private statistic
    (the adaptive D-step schedule reads it). With the auxiliary classifier, `g_class_acc` is
    how often D's class head reads these fakes as the label G was asked for.
    """
    objective, weight = ctx.objective, ctx.config.objective.mode_seeking
    pairs = n // 2 if weight else 0
    labels = ctx.fake_labels(n)
    if pairs and labels is not None:
        labels[pairs:2 * pairs] = labels[:pairs]  # each pair shares its label
    z = paired_latents(ctx.prior, n, pairs, ctx.device)
    fake = ctx.G(z, labels)
    aux = ctx.config.objective.aux_classifier if labels is not None else 0.0
    if aux:
        scores, class_logits = D(fake, labels, classes=True)
    else:
        scores = D(fake, labels)
    loss = objective.g_loss(scores, minimax=ctx.config.objective.minimax_g).mean()
    stats = {}
    if aux:
        class_loss = F.cross_entropy(class_logits, labels)
        loss = loss + aux * class_loss
        stats["g_class_loss"] = class_loss.detach()
        stats["g_class_acc"] = (class_logits.detach().argmax(1) == labels).float().mean()
    if pairs:
        penalty = mode_seeking_penalty(fake[:pairs], fake[pairs:2 * pairs], z[:pairs], z[pairs:2 * pairs])
        loss = loss + weight * penalty
        stats["mode_seeking"] = penalty.detach()
    if ctx.config.latent.mixture_sigma_reg:
        loss = loss + ctx.config.latent.mixture_sigma_reg * ctx.prior.regularizer()
    g_opt.zero_grad(set_to_none=True)
    loss.backward()
    if measure:
        stats["g_grad_norm"] = grad_norm(ctx.G)
    g_opt.step()
    # G's backward pass also filled D's gradients (and, under Opacus, per-sample gradients);
    # drop them so they never leak into D's next step.
    d_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        fooled = objective.says_real(scores.detach()).float().mean()
    return {**stats, "g_loss": loss.detach(), "d_acc_g_fakes": 1.0 - fooled}


def paired_latents(prior: nn.Module, n: int, pairs: int, device) -> Tensor:
    """n latents of which the second `pairs` share the mixture components of the first (for
    the mode-seeking term). A mixture prior makes a collapse to one image per component easy,
    since G can read the component off the means and ignore the rest of z; a pair from two
    components differs anyway, so only same-component pairs penalise that collapse."""
    if not pairs or not isinstance(prior, MixturePrior):
        return prior.sample(n, device=device)
    component = prior.draw_components(n, device=device)
    component[pairs:2 * pairs] = component[:pairs]
    return prior.sample(n, device=device, component=component)


def mode_seeking_penalty(fake_a: Tensor, fake_b: Tensor, z_a: Tensor, z_b: Tensor,
                         eps: float = 1e-5) -> Tensor:
    """Mao et al. 2019 (MSGAN): 1 / (mean |G(z_a) - G(z_b)| / mean |z_a - z_b|), averaged over
    pairs. Small when G's output moves with z; it grows without bound as G ignores z."""
    image_gap = (fake_a - fake_b).abs().flatten(1).mean(1)
    latent_gap = (z_a - z_b).abs().flatten(1).mean(1)
    return (1.0 / (image_gap / latent_gap + eps)).mean()


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
