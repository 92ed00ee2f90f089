"""Known-answer tests of toolkit.metrics: every metric on features, logits or labels whose
score is known in closed form or by a brute-force reference."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from gankit.metrics import (PRDCurve, classifier_score, fid, frechet_distance, kid, mode_coverage, plot_prd,
                             prd, prd_f_beta, prd_from_histograms, prdc)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mixture(n, centers, modes, g):
    """n points from unit Gaussians around centers[modes], the modes used in turn."""
    labels = torch.arange(n) % len(modes)
    return centers[torch.as_tensor(modes)[labels]] + torch.randn(n, centers.shape[1], generator=g)


def random_spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------- Frechet distance, FID, KID

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_general_and_identical():
    g = gen(1)
    s1, s2 = random_spd(10, g).numpy(), random_spd(10, g).numpy()
    mu1, mu2 = np.zeros(10), np.ones(10)
    # Independent route: the textbook sqrtm of the product.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = 10.0 + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    # Singular covariances (rank 3 in 10 dims) must not produce NaN or a complex value.
    low = np.random.default_rng(0).normal(size=(10, 3))
    value = frechet_distance(mu1, low @ low.T, mu1, low @ low.T)
    assert math.isfinite(value) and abs(value) < 1e-6


def test_fid_equals_closed_form_of_sample_statistics():
    g = gen(2)
    # Non-Gaussian, correlated, not centred; 5,000 rows so fid() feeds several chunks.
    x = torch.rand(5000, 16, generator=g) ** 2 @ torch.randn(16, 16, generator=g) + 3.0
    y = torch.randn(4500, 16, generator=g).exp()
    xd, yd = x.double().numpy(), y.double().numpy()
    expected = frechet_distance(xd.mean(0), np.cov(xd, rowvar=False), yd.mean(0), np.cov(yd, rowvar=False))
    assert fid(x, y) == pytest.approx(expected, rel=1e-9)
    assert fid(xd, yd) == pytest.approx(expected, rel=1e-9)  # numpy input
    assert abs(fid(x, x)) < 1e-8


def test_fid_large_sample_near_true_gaussian_distance():
    g = gen(3)
    d, n = 8, 20000
    s1, s2 = random_spd(d, g), random_spd(d, g)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    truth = frechet_distance(mu1, s1, mu2, s2)
    assert truth > 2
    assert fid(x, y) == pytest.approx(truth, rel=0.05)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    g = gen(4)
    x = torch.randn(2000, 32, generator=g)
    y = torch.randn(2000, 32, generator=g)
    same_mean, same_std = kid(x, y, subsets=30, subset_size=500)
    shifted_mean, _ = kid(x, y + 0.5, subsets=30, subset_size=500)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.1
    assert shifted_mean > 20 * (abs(same_mean) + same_std)


def test_kid_reproducible_and_leaves_global_rng_alone():
    g = gen(5)
    x, y = torch.randn(600, 8, generator=g), torch.randn(700, 8, generator=g) + 0.2
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = kid(x, y, subsets=10, subset_size=200, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert kid(x, y, subsets=10, subset_size=200, seed=7) == first
    assert kid(x, y, subsets=10, subset_size=200, seed=8) != first
    # subset_size above the sample counts is capped, not an error.
    mean, std = kid(x, y[:600], subsets=3, subset_size=10_000)
    assert std == pytest.approx(0.0, abs=1e-12)  # every "subset" is the whole of both sets


def test_feature_validation():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="widths"):
        fid(x, torch.randn(50, 5))
    with pytest.raises(ValueError, match="NaN"):
        prdc(x, torch.full((50, 4), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        fid(torch.randn(50), x)


# ---------------------------------------------------------------- precision/recall/density/coverage

def brute_force_prdc(real, fake, k):
    """The definitions, literally, on full float64 distance matrices."""
    real, fake = real.double(), fake.double()
    d_rr = torch.cdist(real, real, compute_mode="donot_use_mm_for_euclid_dist")
    d_ff = torch.cdist(fake, fake, compute_mode="donot_use_mm_for_euclid_dist")
    d_rf = torch.cdist(real, fake, compute_mode="donot_use_mm_for_euclid_dist")
    # Sorted row j: entry 0 is the point itself (distance 0), entry k its k-th other neighbour.
    r_real = d_rr.sort(dim=1).values[:, k]
    r_fake = d_ff.sort(dim=1).values[:, k]
    inside_real = d_rf < r_real[:, None]  # [i, j]: fake j in the ball of real i
    inside_fake = d_rf < r_fake[None, :]  # [i, j]: real i in the ball of fake j
    return dict(precision=inside_real.any(0).double().mean().item(),
                recall=inside_fake.any(1).double().mean().item(),
                density=inside_real.sum().item() / (k * fake.shape[0]),
                coverage=inside_real.any(1).double().mean().item())


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_prdc_identical_sets_are_exactly_one(chunk_size):
    x = torch.randn(400, 16, generator=gen(6)) * 5 + 10  # far from the origin: centring matters
    result = prdc(x, x.clone(), k=3, chunk_size=chunk_size)
    assert result == dict(precision=1.0, recall=1.0, density=1.0, coverage=1.0, f1=1.0)


def test_prdc_far_apart_clusters_are_zero():
    g = gen(7)
    real = torch.randn(300, 8, generator=g)
    fake = torch.randn(250, 8, generator=g) + 100.0
    result = prdc(real, fake, k=5)
    assert result == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0, f1=0.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_chunked_matches_brute_force(k):
    g = gen(8 + k)
    real = torch.randn(150, 6, generator=g)
    fake = torch.randn(120, 6, generator=g) * 1.3 + 0.4
    expected = brute_force_prdc(real, fake, k)
    assert 0 < expected["precision"] < 1 and 0 < expected["coverage"] < 1  # a non-trivial case
    for chunk_size in (1, 7, 50, 150, 1000, None):
        result = prdc(real, fake, k=k, chunk_size=chunk_size)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-12), (key, chunk_size)
        p, r = result["precision"], result["recall"]
        assert result["f1"] == pytest.approx(2 * p * r / (p + r))


def test_prdc_fake_on_half_the_modes():
    g = gen(9)
    centers = torch.randn(10, 2, generator=g) * 30
    real = mixture(2000, centers, list(range(10)), g)
    fake = mixture(2000, centers, list(range(5)), g)  # mode collapse onto 5 of 10 modes
    result = prdc(real, fake, k=3)
    assert result["precision"] > 0.93
    # About half the real points have a fake neighbour; k = 3 balls vary with the draw (up to 0.58).
    assert 0.42 < result["recall"] < 0.6
    assert 0.42 < result["coverage"] < 0.6


def test_prdc_needs_more_than_k_points():
    with pytest.raises(ValueError, match="at least 4"):
        prdc(torch.randn(3, 2), torch.randn(10, 2), k=3)


# ---------------------------------------------------------------- PRD curves

def test_prd_from_histograms_known_curve():
    # P = (1/2, 1/2), Q = (1, 0): alpha = min(lambda/2, 1), beta = min(1/2, 1/lambda).
    curve = prd_from_histograms([5, 5], [3, 0], num_angles=1001)
    slopes = np.tan(np.linspace(1e-10, np.pi / 2 - 1e-10, 1001))
    np.testing.assert_allclose(curve.precision, np.minimum(slopes / 2, 1), atol=1e-12)
    np.testing.assert_allclose(curve.recall, np.minimum(0.5, 1 / slopes), atol=1e-12)
    assert curve.precision[500] == pytest.approx(0.5) and curve.recall[500] == pytest.approx(0.5)
    # F_beta maximised over the curve; the best point has precision 1, recall 1/2.
    f8, f18 = prd_f_beta(curve, beta=8)
    assert f8 == pytest.approx(65 * 0.5 / (64 + 0.5), rel=1e-4)  # 1001 slopes miss the kink slightly
    assert f18 == pytest.approx((1 + 1 / 64) * 0.5 / (1 / 64 + 0.5), rel=1e-4)


def test_prd_identical_distributions_reach_one_one():
    g = gen(10)
    centers = torch.randn(10, 8, generator=g) * 10
    real = mixture(3000, centers, list(range(10)), g)
    fake = mixture(3000, centers, list(range(10)), g)
    curve = prd(real, fake, num_clusters=20, num_runs=3)
    assert np.max(np.minimum(curve.precision, curve.recall)) > 0.9
    f8, f18 = prd_f_beta(curve)
    assert f8 > 0.95 and f18 > 0.95
    # The ordering: precision rises and recall falls along the slopes.
    assert np.all(np.diff(curve.precision) >= -1e-12)
    assert np.all(np.diff(curve.recall) <= 1e-12)


def test_prd_disjoint_and_collapsed():
    g = gen(11)
    centers = torch.randn(10, 8, generator=g) * 10
    real = mixture(2000, centers, list(range(10)), g)
    far = torch.randn(2000, 8, generator=g) + 1000.0
    f8, f18 = prd_f_beta(prd(real, far, num_runs=2))
    assert f8 < 0.01 and f18 < 0.01
    # Half the modes: precision stays high, recall drops (F_8 about 1/2, F_1/8 near 1).
    collapsed = mixture(2000, centers, list(range(5)), g)
    f8, f18 = prd_f_beta(prd(real, collapsed, num_runs=2))
    assert f18 > 0.9 and 0.4 < f8 < 0.65


def test_prd_is_seeded():
    g = gen(12)
    real, fake = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) + 0.5
    a, b = prd(real, fake, num_runs=2, seed=3), prd(real, fake, num_runs=2, seed=3)
    np.testing.assert_array_equal(a.precision, b.precision)
    np.testing.assert_array_equal(a.recall, b.recall)


def test_plot_prd_writes_png(tmp_path):
    curve = prd_from_histograms([1, 1, 2], [2, 1, 0], num_angles=101)
    path = plot_prd({"model": curve, "ideal": PRDCurve(np.ones(2), np.ones(2))}, tmp_path / "sub" / "prd.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- classifier score, mode coverage

def test_classifier_score_uniform_predictions_is_one():
    mean, std = classifier_score(torch.zeros(1000, 10), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_classifier_score_confident_even_predictions_is_num_classes():
    num_classes = 10
    labels = torch.arange(2000) % num_classes  # every split holds each class equally often
    logits = 100.0 * torch.nn.functional.one_hot(labels, num_classes).float()  # exp(-100) underflows in p
    mean, std = classifier_score(logits, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-9) and std < 1e-9


def test_classifier_score_matches_direct_formula():
    logits = torch.randn(300, 7, generator=gen(13)) * 3
    p = torch.softmax(logits.double(), dim=1).numpy()
    parts = np.array_split(p, 3)
    direct = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), axis=1))) for q in parts]
    mean, std = classifier_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(direct), rel=1e-10)
    assert std == pytest.approx(np.std(direct), rel=1e-8)


def test_mode_coverage_collapsed_and_uniform():
    collapsed = mode_coverage(torch.full((500,), 3), num_classes=10)
    assert collapsed["covered"] == 1
    assert collapsed["counts"][3] == 500 and sum(collapsed["counts"]) == 500
    assert collapsed["tv_to_uniform"] == pytest.approx(1 - 1 / 10)
    assert collapsed["kl_from_uniform"] == pytest.approx(math.log(10))

    uniform = mode_coverage(np.arange(1000) % 10, num_classes=10)
    assert uniform["covered"] == 10
    assert uniform["fractions"] == [0.1] * 10
    assert uniform["kl_from_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert uniform["tv_to_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_mode_coverage_threshold_and_validation():
    # 1,000 labels over 10 classes: the uniform share is 100, the threshold 10 (inclusive).
    labels = [0] * 10 + [1] * 9 + [2] * 981
    result = mode_coverage(labels, num_classes=10)
    assert result["covered"] == 2
    with pytest.raises(ValueError):
        mode_coverage([0, 10], num_classes=10)
    with pytest.raises(ValueError):
        mode_coverage([], num_classes=10)


def test_within_class_spread_is_the_mean_per_pixel_std_of_each_class():
    from gankit.metrics import within_class_spread
    images = torch.tensor([[0.0, 0.0], [2.0, 2.0],      # class 0: std sqrt(2) at each pixel
                           [1.0, 1.0], [1.0, 1.0],      # class 1: identical images, std 0
                           [5.0, -5.0]])                # class 2: one image, left out
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert within_class_spread(images, labels) == pytest.approx(math.sqrt(2) / 2)
    with pytest.raises(ValueError):
        within_class_spread(images[4:], labels[4:])
