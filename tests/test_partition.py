"""Federated data partitions: disjoint, complete, seeded, and skewed as asked."""

import numpy as np
import pytest
import torch

from gankit.errors import ConfigError
from gankit.partition import class_histogram, histogram_table, partition, save_histogram

LABELS = torch.arange(10).repeat_interleave(100)  # 1,000 images, 100 per class


def assert_exact_cover(parts, n):
    joined = torch.cat(parts)
    assert len(joined) == n and torch.equal(joined.sort().values, torch.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_every_image_goes_to_exactly_one_client_and_the_seed_fixes_the_split(scheme):
    a = partition(len(LABELS), LABELS, 5, scheme, alpha=0.5, classes_per_client=2, seed=3)
    b = partition(len(LABELS), LABELS, 5, scheme, alpha=0.5, classes_per_client=2, seed=3)
    c = partition(len(LABELS), LABELS, 5, scheme, alpha=0.5, classes_per_client=2, seed=4)
    assert_exact_cover(a, len(LABELS))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_iid_shares_are_equal_and_class_balanced():
    hist = np.array(class_histogram(LABELS, partition(len(LABELS), LABELS, 4, "iid", seed=0), 10))
    assert set(hist.sum(1)) == {250}
    assert hist.min() >= 10  # 25 expected per class and client


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_tv_to_global(alpha):
        hist = np.array(class_histogram(LABELS, partition(len(LABELS), LABELS, 10, "dirichlet", alpha=alpha,
                                                          seed=0, min_size=10), 10), float)
        p = hist / hist.sum(1, keepdims=True)
        return 0.5 * np.abs(p - 0.1).sum(1).mean()

    near_iid, skewed, extreme = (mean_tv_to_global(a) for a in (100.0, 1.0, 0.1))
    assert near_iid < 0.1 < skewed < extreme
    assert extreme > 0.6  # at alpha 0.1 a client holds mostly one or two classes


def test_pathological_gives_each_client_exactly_k_classes():
    for k in (1, 2, 3):
        hist = np.array(class_histogram(LABELS, partition(len(LABELS), LABELS, 10, "pathological",
                                                          classes_per_client=k, seed=1), 10))
        assert ((hist > 0).sum(1) == k).all()


def test_unlabelled_data_splits_iid():
    parts = partition(10, None, 3, "iid", seed=0)
    assert_exact_cover(parts, 10)
    assert [len(p) for p in parts] == [4, 3, 3]


def test_bad_requests_are_user_errors():
    with pytest.raises(ConfigError, match="unknown partition"):
        partition(len(LABELS), LABELS, 2, "round-robin")
    with pytest.raises(ConfigError, match="alpha must be positive"):
        partition(len(LABELS), LABELS, 2, "dirichlet", alpha=0)
    with pytest.raises(ConfigError, match="cannot give"):
        partition(5, LABELS[:5], 10)
    with pytest.raises(ConfigError, match="classes per client"):
        partition(len(LABELS), LABELS, 2, "pathological", classes_per_client=11)
    with pytest.raises(ConfigError, match="no labels"):
        partition(100, None, 2, "dirichlet")


def test_histogram_is_saved_and_printable(tmp_path):
    parts = partition(len(LABELS), LABELS, 3, "pathological", classes_per_client=2, seed=0)
    hist = class_histogram(LABELS, parts, 10)
    save_histogram(tmp_path, hist, "pathological", classes_per_client=2)
    assert (tmp_path / "partition.json").exists() and (tmp_path / "partition.png").exists()
    text = histogram_table(hist)
    assert len(text.splitlines()) == 4 and text.splitlines()[1].split()[-1] == str(len(parts[0]))
