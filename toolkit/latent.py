"""Latent priors: what the generator's input z is drawn from.

- Gaussian N(0, sigma^2 I): sigma < 1 at sampling time is "soft truncation".
- Hard truncation (Brock et al. 2019): entries beyond a threshold are redrawn, i.e. z comes
  from a truncated normal (sampled exactly by torch's inverse-CDF `trunc_normal_`).
- Gaussian mixture (DeLiGAN, Gurumurthy et al. 2017): z = mu_k + sigma_k * eps with k
  uniform over K components; the means and scales can be learned with the generator, with
  DeLiGAN's penalty sum((1 - sigma)^2) keeping the scales from collapsing to zero.

Priors are modules so that learnable ones are saved with the generator's checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from gankit.config import LatentConfig


def standard_normal(shape, truncation: float = 0.0, generator: Optional[torch.Generator] = None,
                    device=None) -> Tensor:
    """N(0, 1) samples; with truncation > 0, restricted to [-truncation, truncation]."""
    z = torch.empty(shape, device=device)
    if truncation > 0:
        return nn.init.trunc_normal_(z, 0.0, 1.0, -truncation, truncation, generator=generator)
    return z.normal_(generator=generator)


class GaussianPrior(nn.Module):
    def __init__(self, dim: int, sigma: float = 1.0, truncation: float = 0.0):
        super().__init__()
        self.dim, self.sigma, self.truncation = dim, sigma, truncation

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               sigma: Optional[float] = None, truncation: Optional[float] = None,
               device=None) -> Tensor:
        sigma = self.sigma if sigma is None else sigma
        truncation = self.truncation if truncation is None else truncation
        # Truncation bounds z itself, so the threshold is in units of sigma.
        eps = standard_normal((n, self.dim), truncation / sigma if truncation else 0.0,
                              generator, device)
        return sigma * eps

    def regularizer(self) -> Tensor:
        return torch.zeros(())


class MixturePrior(nn.Module):
    def __init__(self, dim: int, components: int, learnable: bool = True,
                 sigma_init: float = 0.2, sigma: float = 1.0, truncation: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.dim, self.sigma, self.truncation = dim, sigma, truncation
        # DeLiGAN's initialisation: means uniform in [-1, 1], equal small scales.
        init = torch.Generator().manual_seed(seed)
        means = torch.rand(components, dim, generator=init) * 2 - 1
        scales = torch.full((components, dim), float(sigma_init))
        self.means = nn.Parameter(means, requires_grad=learnable)
        self.scales = nn.Parameter(scales, requires_grad=learnable)

    @property
    def components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               sigma: Optional[float] = None, truncation: Optional[float] = None,
               device=None, component: Optional[Tensor] = None) -> Tensor:
        sigma = self.sigma if sigma is None else sigma
        truncation = self.truncation if truncation is None else truncation
        device = device or self.means.device
        if component is None:
            component = self.draw_components(n, generator, device)
        # Truncation and the soft-truncation scale act on the standardised noise eps.
        eps = sigma * standard_normal((n, self.dim), truncation, generator, device)
        return self.means[component] + self.scales[component] * eps

    def draw_components(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        """Uniform component indices, as sample() draws them."""
        return torch.randint(self.components, (n,), generator=generator,
                             device=device or self.means.device)

    def regularizer(self) -> Tensor:
        return ((1.0 - self.scales) ** 2).sum()


def build_prior(cfg: LatentConfig, seed: int = 0) -> nn.Module:
    if cfg.prior == "mixture":
        return MixturePrior(cfg.latent_dim, cfg.mixture_components, cfg.mixture_learnable,
                            cfg.mixture_sigma_init, cfg.latent_sigma, cfg.truncation, seed)
    return GaussianPrior(cfg.latent_dim, cfg.latent_sigma, cfg.truncation)


def sample_labels(n: int, num_classes: int, generator: Optional[torch.Generator] = None,
                  device=None) -> Optional[Tensor]:
    """Uniform class labels for a conditional generator; None when there are no classes."""
    if num_classes < 2:
        return None
    return torch.randint(num_classes, (n,), generator=generator, device=device)
