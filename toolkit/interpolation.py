"""Latent-space exploration: paths, mixtures, grids and class sweeps.

Every function returns latents (and labels where they matter) to feed the generator; none
runs the generator, so all of this works with any prior and any model. Paths and grids are
(n, d) tensors in row-major order, ready for `torchvision.utils.save_image(..., nrow=cols)`.

Why slerp: a d-dimensional N(0, I) latent has norm close to sqrt(d), so nearly all prior
mass lies near a sphere. Linear interpolation between two such latents cuts through the
sphere's inside (the midpoint of two orthogonal samples has norm sqrt(d / 2)), where the
generator saw few inputs; spherical interpolation (Shoemake 1985, as used for GANs by
White 2016, "Sampling Generative Networks") stays on it when the endpoints have equal norm.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from gankit.errors import UserError

# Below this sin(angle) two directions count as (anti)parallel and slerp falls back to lerp.
PARALLEL_SIN = 1e-6


def lerp(z0: Tensor, z1: Tensor, steps: int) -> Tensor:
    """(steps, d) points evenly spaced on the segment from z0 to z1, both included."""
    z0, z1 = _pair(z0, z1, steps)
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64, device=z0.device)[:, None]
    path = (1.0 - t) * z0.double() + t * z1.double()
    return _with_endpoints(path.to(z0.dtype), z0, z1)


def slerp(z0: Tensor, z1: Tensor, steps: int) -> Tensor:
    """(steps, d) spherical interpolation from z0 to z1, both included, at equal angle steps.

    z(t) = sin((1 - t) w) / sin(w) z0 + sin(t w) / sin(w) z1, w the angle between z0 and z1.
    With |z0| = |z1| every point has that norm. (Anti)parallel or zero vectors have no
    unique great circle: then the result is `lerp`.
    """
    z0, z1 = _pair(z0, z1, steps)
    a, b = z0.double(), z1.double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return lerp(z0, z1, steps)
    cos = (a @ b / norms).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < PARALLEL_SIN:
        return lerp(z0, z1, steps)
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64, device=z0.device)[:, None]
    path = (torch.sin((1.0 - t) * omega) * a + torch.sin(t * omega) * b) / sin
    return _with_endpoints(path.to(z0.dtype), z0, z1)


def interpolate_path(anchors: Tensor, steps_per_segment: int, method: str = "slerp",
                     closed: bool = False) -> Tensor:
    """A path through the rows of `anchors` (k, d), k >= 2.

    Each segment has `steps_per_segment` points including its ends; shared ends appear
    once, so the path has (segments * (steps_per_segment - 1) + 1) rows and anchor i is row
    i * (steps_per_segment - 1). closed=True adds a segment back to the first anchor and
    drops the repeated last row, so the path loops seamlessly (e.g. for an animation).
    """
    interpolate = {"slerp": slerp, "lerp": lerp}.get(method)
    if interpolate is None:
        raise UserError(f"unknown interpolation '{method}' (choose from slerp, lerp)")
    if anchors.dim() != 2 or anchors.shape[0] < 2:
        raise UserError(f"anchors must be a (k, d) tensor with k >= 2, got {tuple(anchors.shape)}")
    stops = torch.cat([anchors, anchors[:1]]) if closed else anchors
    segments = [interpolate(stops[i], stops[i + 1], steps_per_segment)[:-1]
                for i in range(stops.shape[0] - 1)]
    if not closed:
        segments.append(anchors[-1:])
    return torch.cat(segments)


def dirichlet_mix(anchors: Tensor, n: int, alpha: Union[float, Tensor] = 1.0,
                  generator: Optional[torch.Generator] = None,
                  renormalize: Union[bool, str, float] = False) -> tuple[Tensor, Tensor]:
    """n convex combinations of the rows of `anchors` (k, d), weights ~ Dirichlet(alpha).

    Returns (z (n, d), weights (n, k)). alpha is a scalar or one value per anchor; alpha = 1
    spreads the weights uniformly over the simplex, alpha < 1 keeps mixtures near single
    anchors, alpha > 1 pulls them towards the anchors' mean.

    Mixing shrinks the norm: k independent N(0, I) anchors mixed with weights w give a
    latent of expected squared norm d * sum(w^2), below the prior's typical d, so mixtures
    fall inside the shell where the prior's mass lies. `renormalize` rescales each mixture
    (its direction unchanged, so it leaves the convex hull):
      False      keep the convex combination;
      True or "anchors"  to the anchors' mean norm, which respects the prior actually used
                 (a latent scale sigma, truncation, a mixture prior);
      "gaussian" to sqrt(d), the typical norm of a d-dimensional N(0, I) sample;
      a float    to that norm.
    Reproducible by `generator`'s state (it is advanced; torch's global RNG is left alone).
    """
    if anchors.dim() != 2 or anchors.shape[0] < 1:
        raise UserError(f"anchors must be a (k, d) tensor, got {tuple(anchors.shape)}")
    if n < 1:
        raise UserError(f"number of mixtures must be positive, got {n}")
    k, d = anchors.shape
    concentration = torch.as_tensor(alpha, dtype=torch.float64).expand(k).clone()
    if not (concentration > 0).all():
        raise UserError(f"Dirichlet alpha must be positive, got {alpha}")
    dirichlet = torch.distributions.Dirichlet(concentration)
    if generator is None:
        weights = dirichlet.sample((n,))
    else:
        # Dirichlet takes no generator: draw its seed from ours and sample on a forked RNG.
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            weights = dirichlet.sample((n,))
    z = weights @ anchors.to("cpu", torch.float64)
    target = _target_norm(renormalize, anchors, d)
    if target is not None:
        z = z * (target / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return z.to(anchors.device, anchors.dtype), weights.to(anchors.device, anchors.dtype)


def _target_norm(renormalize, anchors: Tensor, d: int) -> Optional[float]:
    if renormalize is False or renormalize is None:
        return None
    if renormalize is True or renormalize == "anchors":
        return anchors.double().norm(dim=1).mean().item()
    if renormalize == "gaussian":
        return math.sqrt(d)
    if isinstance(renormalize, (int, float)) and renormalize > 0:
        return float(renormalize)
    raise UserError(f"renormalize must be False, True, 'anchors', 'gaussian' or a positive norm, "
                    f"got {renormalize!r}")


def latent_grid(center: Tensor, rows: int, cols: int, span: float,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(rows * cols, d) latents on a grid in a random plane through `center`, row-major.

    The plane is spanned by two random orthonormal directions u (along a row) and v (down
    a column); the grid reaches `span` latent units from the center in each direction, so
    corners sit at center +- span u +- span v. With odd rows and cols the middle cell is
    `center` itself.
    """
    if center.dim() != 1 or center.shape[0] < 2:
        raise UserError(f"center must be a (d,) tensor with d >= 2, got {tuple(center.shape)}")
    if rows < 1 or cols < 1:
        raise UserError(f"grid needs at least one row and column, got {rows} x {cols}")
    d = center.shape[0]
    gaussian = torch.randn(d, 2, generator=generator, dtype=torch.float64)
    # QR of a Gaussian matrix gives a uniformly random orthonormal pair.
    directions, _ = torch.linalg.qr(gaussian)
    u, v = directions[:, 0], directions[:, 1]
    across, down = _offsets(cols, span), _offsets(rows, span)
    grid = (center.to("cpu", torch.float64) + down[:, None, None] * v
            + across[None, :, None] * u)
    return grid.reshape(rows * cols, d).to(center.device, center.dtype)


def _offsets(count: int, span: float) -> Tensor:
    if count == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(-span, span, count, dtype=torch.float64)


def class_grid(z: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Latents and labels for an (r rows x num_classes columns) grid, row-major.

    Row i repeats z[i] under every class; column j is class j. Save with nrow=num_classes.
    """
    if num_classes < 2:
        raise UserError("a class grid needs a conditional model (at least 2 classes)")
    if z.dim() != 2:
        raise UserError(f"z must be an (r, d) tensor, got {tuple(z.shape)}")
    latents = z.repeat_interleave(num_classes, dim=0)
    labels = torch.arange(num_classes, device=z.device).repeat(z.shape[0])
    return latents, labels


def random_latents(prior, n: int, generator: Optional[torch.Generator] = None, device=None,
                   **kwargs) -> Tensor:
    """n latents from a prior of `toolkit.latent` (kwargs: sigma, truncation)."""
    return prior.sample(n, generator=generator, device=device, **kwargs)


def _pair(z0: Tensor, z1: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    if z0.dim() != 1 or z0.shape != z1.shape:
        raise UserError(f"interpolation needs two (d,) latents, got {tuple(z0.shape)} "
                        f"and {tuple(z1.shape)}")
    if steps < 2:
        raise UserError(f"interpolation needs at least 2 steps, got {steps}")
    return z0, z1.to(z0.device, z0.dtype)


def _with_endpoints(path: Tensor, z0: Tensor, z1: Tensor) -> Tensor:
    # Rounding must not move the ends: a path starts and stops exactly at its inputs.
    path[0], path[-1] = z0, z1
    return path
