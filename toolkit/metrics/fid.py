"""Frechet distance (FID) and kernel distance (KID) between two sets of feature vectors.

`fid` and `kid` run torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` with an
identity "feature extractor", so the library does the statistics on features we computed
ourselves (any network, any width F) and nothing is downloaded (torch-fidelity is only needed for
torchmetrics' default Inception network). `frechet_distance` is the closed form on given
Gaussian parameters, used to check `fid` and to score known distributions.

What torchmetrics does with a custom module (checked in torchmetrics 1.9 source):
- FID: `update(x, real)` calls `module(x)`; the width comes from `module.num_features` (without
  it, torchmetrics would push a random 3x299x299 image through the module). The sum and the
  raw second moment sum(x x^T) are accumulated in float64 whatever the input dtype (F*F doubles
  per set, so memory does not grow with N), but `compute()` casts the result back to the dtype
  of the last batch: we feed float64 to get a float64 result.
- KID: `update` appends the module's output to a list (all features are kept, in their own dtype:
  we feed float64) and `compute()` draws its subsets with the global `torch.randperm`, hence the
  local `fork_rng`; it also raises if `subset_size` exceeds either sample count.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["frechet_distance", "fid", "kid"]

# Rows per update call: bounds torchmetrics' temporaries per update.
_CHUNK = 4096


def _as_features(x, name: str, dtype=torch.float64) -> torch.Tensor:
    """A 2-D, finite CPU tensor of `dtype` from a tensor or array-like of shape (N, F)."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=dtype)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, F), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    # A diverged generator gives NaN features; a silent NaN score would hide it.
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_pair(real, fake, min_rows: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    r = _as_features(real, "real_features", dtype)
    f = _as_features(fake, "fake_features", dtype)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature widths differ: real {r.shape[1]}, fake {f.shape[1]}")
    if r.shape[0] < min_rows or f.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} samples per set, "
                         f"got real {r.shape[0]}, fake {f.shape[0]}")
    return r, f


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()  # tensors that need grad or live on a GPU
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), the Frechet distance of two Gaussians.

    Computed in float64 by a symmetric route: Tr((S1 S2)^{1/2}) equals the sum of the square
    roots of the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}. Both steps use
    `eigh`, so there are no spurious imaginary parts (as general `sqrtm` / `eigvals` of the
    non-symmetric S1 S2 produce); tiny negative eigenvalues from round-off are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    s1, s2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}")
    # Sample covariances are symmetric only up to round-off; eigh reads one triangle.
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class _Identity(nn.Module):
    """Stands in for torchmetrics' feature network: our inputs already are the features."""

    def __init__(self, num_features: int):
        super().__init__()
        # Read by FrechetInceptionDistance to size its state without a dummy forward pass.
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real_features, fake_features) -> float:
    """FID between two (N, F) feature sets, computed by torchmetrics' FrechetInceptionDistance.

    Equals `frechet_distance` of the sample means and (N-1)-normalised covariances.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _check_pair(real_features, fake_features, min_rows=2)
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    for start in range(0, real.shape[0], _CHUNK):
        metric.update(real[start:start + _CHUNK], real=True)
    for start in range(0, fake.shape[0], _CHUNK):
        metric.update(fake[start:start + _CHUNK], real=False)
    return float(metric.compute())


def kid(real_features, fake_features, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets) by torchmetrics' KernelInceptionDistance.

    Unbiased MMD^2 with the cubic polynomial kernel (x.y / F + 1)^3. `subset_size` is capped at
    the smaller sample count. The subsets depend only on `seed`: the global torch RNG is forked,
    so neither the caller's RNG state nor earlier draws affect (or are affected by) the result.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _check_pair(real_features, fake_features, min_rows=2)
    size = min(int(subset_size), real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    with warnings.catch_warnings():
        # The constructor always warns that features are buffered; we know, and they are small.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=int(subsets),
                                         subset_size=size)
    for start in range(0, real.shape[0], _CHUNK):
        metric.update(real[start:start + _CHUNK], real=True)
    for start in range(0, fake.shape[0], _CHUNK):
        metric.update(fake[start:start + _CHUNK], real=False)
    # Only the CPU generator draws the subsets (torch.randperm); devices=[] and seeding just
    # that generator leave any CUDA RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)
