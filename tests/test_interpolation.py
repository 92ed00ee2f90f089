"""Latent exploration: interpolation, Dirichlet mixtures, grids."""

import math

import pytest
import torch

from gankit.errors import UserError
from gankit.interpolation import (class_grid, dirichlet_mix, interpolate_path, latent_grid, lerp,
                                   random_latents, slerp)
from gankit.latent import GaussianPrior


def two_latents(d=16, seed=0):
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=rng), torch.randn(d, generator=rng)


@pytest.mark.parametrize("interpolate", [lerp, slerp])
def test_endpoints_are_the_inputs(interpolate):
    z0, z1 = two_latents()
    path = interpolate(z0, z1, 7)
    assert path.shape == (7, 16) and path.dtype == z0.dtype
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)


def test_lerp_midpoint_is_the_mean_and_steps_are_equal():
    z0, z1 = two_latents()
    path = lerp(z0, z1, 5)
    assert torch.allclose(path[2], (z0 + z1) / 2, atol=1e-6)
    gaps = (path[1:] - path[:-1]).norm(dim=1)
    assert torch.allclose(gaps, gaps[0].expand(4), atol=1e-5)


def test_slerp_of_equal_norms_stays_on_the_sphere_at_equal_angles():
    z0, z1 = two_latents()
    z1 = z1 * z0.norm() / z1.norm()
    path = slerp(z0, z1, 9).double()
    assert torch.allclose(path.norm(dim=1), z0.norm().double().expand(9), rtol=1e-5)
    unit = path / path.norm(dim=1, keepdim=True)
    angles = torch.arccos((unit[1:] * unit[:-1]).sum(dim=1).clamp(-1, 1))
    total = torch.arccos((unit[0] @ unit[-1]).clamp(-1, 1))
    assert torch.allclose(angles, (total / 8).expand(8), atol=1e-4)


def test_slerp_falls_back_to_lerp_for_parallel_and_opposite_vectors():
    z0 = torch.tensor([1.0, 2.0, 3.0])
    for z1 in (2 * z0, -z0, torch.zeros(3)):
        assert torch.allclose(slerp(z0, z1, 5), lerp(z0, z1, 5))


def test_path_through_anchors():
    anchors = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    path = interpolate_path(anchors, 5, method="lerp")
    assert path.shape == (3 * 4 + 1, 8)
    assert torch.equal(path[::4], anchors)
    assert torch.allclose(path[2], (anchors[0] + anchors[1]) / 2)
    loop = interpolate_path(anchors, 5, method="slerp", closed=True)
    assert loop.shape == (4 * 4, 8) and torch.equal(loop[::4], anchors)
    assert torch.allclose(loop[-1], slerp(anchors[3], anchors[0], 5)[-2])
    with pytest.raises(UserError, match="unknown interpolation"):
        interpolate_path(anchors, 5, method="cubic")


def test_dirichlet_weights_form_convex_combinations():
    # Unit vectors as anchors: a mixture's coordinates are its weights, so it lies in the
    # convex hull (the simplex) exactly when they are non-negative and sum to 1.
    anchors = torch.eye(4)
    z, weights = dirichlet_mix(anchors, 500, alpha=0.5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (500, 4) and weights.shape == (500, 4)
    assert (weights >= 0).all() and torch.allclose(weights.sum(dim=1), torch.ones(500))
    assert torch.allclose(z, weights)
    general = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    z, weights = dirichlet_mix(general, 100, alpha=2.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(z, weights @ general, atol=1e-6)


def test_dirichlet_mix_is_reproducible_and_leaves_the_global_rng_alone():
    anchors = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = dirichlet_mix(anchors, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    b = dirichlet_mix(anchors, 20, generator=torch.Generator().manual_seed(7))
    c = dirichlet_mix(anchors, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_dirichlet_mean_weights_follow_alpha():
    alpha = torch.tensor([1.0, 2.0, 7.0])
    _, weights = dirichlet_mix(torch.eye(3), 20_000, alpha=alpha,
                               generator=torch.Generator().manual_seed(0))
    assert weights.mean(dim=0).tolist() == pytest.approx([0.1, 0.2, 0.7], abs=0.01)


def test_renormalized_mixtures_restore_the_norm():
    d = 64
    anchors = torch.randn(6, d, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    plain, _ = dirichlet_mix(anchors, 50, generator=rng)
    assert plain.norm(dim=1).mean() < 0.8 * anchors.norm(dim=1).mean()  # mixing shrinks
    mean_norm = anchors.norm(dim=1).mean()
    for option, norm in ((True, mean_norm), ("anchors", mean_norm), ("gaussian", math.sqrt(d)),
                         (5.0, 5.0)):
        z, weights = dirichlet_mix(anchors, 50, generator=torch.Generator().manual_seed(1),
                                   renormalize=option)
        assert torch.allclose(z.norm(dim=1), torch.full((50,), float(norm)), rtol=1e-5)
        # Same direction as the plain convex combination.
        assert torch.allclose(z / z.norm(dim=1, keepdim=True),
                              plain / plain.norm(dim=1, keepdim=True), atol=1e-5)
    with pytest.raises(UserError, match="renormalize"):
        dirichlet_mix(anchors, 5, renormalize="sphere")


@pytest.mark.parametrize("rows, cols", [(5, 7), (3, 3), (1, 5)])
def test_grid_is_centered_and_spans_an_orthonormal_plane(rows, cols):
    center = torch.randn(12, generator=torch.Generator().manual_seed(0))
    grid = latent_grid(center, rows, cols, span=2.0, generator=torch.Generator().manual_seed(1))
    assert grid.shape == (rows * cols, 12)
    assert torch.allclose(grid[(rows // 2) * cols + cols // 2], center, atol=1e-6)
    cells = grid.reshape(rows, cols, 12).double()
    if cols > 1:
        across = cells[0, -1] - cells[0, 0]
        assert across.norm().item() == pytest.approx(4.0, rel=1e-5)  # from -span to +span
        steps = cells[:, 1:] - cells[:, :-1]
        assert torch.allclose(steps, steps[0, 0].expand_as(steps), atol=1e-5)  # even spacing
    if rows > 1:
        down = cells[-1, 0] - cells[0, 0]
        assert down.norm().item() == pytest.approx(4.0, rel=1e-5)
        if cols > 1:
            assert abs((across @ down).item()) < 1e-5  # the two directions are orthogonal


def test_grid_is_reproducible_by_seed():
    center = torch.zeros(8)
    a = latent_grid(center, 3, 3, 1.0, generator=torch.Generator().manual_seed(0))
    b = latent_grid(center, 3, 3, 1.0, generator=torch.Generator().manual_seed(0))
    c = latent_grid(center, 3, 3, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_class_grid_rows_share_z_and_columns_share_the_class():
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    latents, labels = class_grid(z, 4)
    assert latents.shape == (12, 6) and labels.tolist() == [0, 1, 2, 3] * 3
    cells = latents.reshape(3, 4, 6)
    for row in range(3):
        assert torch.equal(cells[row], z[row].expand(4, 6))
    with pytest.raises(UserError, match="conditional"):
        class_grid(z, 0)


def test_random_latents_use_the_prior():
    prior = GaussianPrior(10, sigma=0.5)
    a = random_latents(prior, 4, generator=torch.Generator().manual_seed(0))
    b = prior.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 10)


def test_bad_arguments_are_user_errors():
    z0, z1 = two_latents()
    with pytest.raises(UserError):
        lerp(z0, z1, 1)
    with pytest.raises(UserError):
        slerp(z0, z1[:3], 5)
    with pytest.raises(UserError):
        dirichlet_mix(torch.eye(3), 5, alpha=0.0)
