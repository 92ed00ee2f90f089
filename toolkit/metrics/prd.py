"""Precision-recall curves for distributions (PRD; Sajjadi et al. 2018).

With the reference distribution P (real) and the model distribution Q (generated) given as
histograms p, q over a shared partition of feature space, the PRD curve is the set of pairs

    alpha(lambda) = sum_i min(lambda p_i, q_i)     precision: how much of Q lies where P does
    beta(lambda)  = alpha(lambda) / lambda          recall: how much of P that Q reaches

for slopes lambda = tan(angle), angle in (0, pi/2). The partition comes from k-means on the union
of both feature sets; as in the paper, curves of several clusterings (different seeds) are
averaged, because one clustering's curve depends on where its centres happened to land.
Summaries: F_8 (max over the curve, weighs recall) and F_1/8 (weighs precision).

Clustering the union works best with equally many real and fake points (the paper enforces it);
unequal sets are accepted, but the larger one then has more say in where the clusters go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gankit.files import make_folder, save_figure

from .fid import _check_pair

__all__ = ["PRDCurve", "prd", "prd_from_histograms", "prd_f_beta", "plot_prd"]


# eq=False: comparing arrays field by field has no single truth value.
@dataclass(frozen=True, eq=False)
class PRDCurve:
    """One PRD curve: precision[i] and recall[i] belong to the i-th slope (increasing)."""

    precision: np.ndarray
    recall: np.ndarray


def _angles(num_angles: int) -> np.ndarray:
    # The open interval: slope 0 and slope infinity carry no information (alpha = 0, beta = 0).
    eps = 1e-10
    return np.linspace(eps, np.pi / 2 - eps, int(num_angles))


def prd_from_histograms(real_hist, fake_hist, num_angles: int = 1001) -> PRDCurve:
    """The PRD curve of two histograms over the same bins (normalised here)."""
    p = np.asarray(real_hist, dtype=np.float64)
    q = np.asarray(fake_hist, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(f"histograms must be 1-D and of equal length, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("histograms must be non-negative with a positive total")
    if num_angles < 2:
        raise ValueError(f"num_angles must be at least 2, got {num_angles}")
    p, q = p / p.sum(), q / q.sum()
    slopes = np.tan(_angles(num_angles))
    alpha = np.minimum(slopes[:, None] * p[None, :], q[None, :]).sum(axis=1)
    beta = alpha / slopes
    # Round-off can push either a hair past 1.
    return PRDCurve(precision=np.clip(alpha, 0.0, 1.0), recall=np.clip(beta, 0.0, 1.0))


def prd(real_features, fake_features, num_clusters: int = 20, num_angles: int = 1001,
        num_runs: int = 10, seed: int = 0, n_init: int = 3) -> PRDCurve:
    """PRD curve of fake vs real (N, F) features, averaged over `num_runs` seeded clusterings.

    Each run clusters the union with MiniBatchKMeans (random_state = seed + run, `n_init`
    restarts) and histograms both sets over the clusters.
    """
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    real, fake = _check_pair(real_features, fake_features, min_rows=1)
    real, fake = real.numpy(), fake.numpy()
    data = np.concatenate([real, fake]).astype(np.float32)  # float32 halves k-means' time
    if not 1 <= num_clusters <= data.shape[0]:
        raise ValueError(f"num_clusters must be in [1, {data.shape[0]}], got {num_clusters}")
    if num_runs < 1:
        raise ValueError(f"num_runs must be at least 1, got {num_runs}")
    precision = np.zeros(int(num_angles))
    recall = np.zeros(int(num_angles))
    for run in range(num_runs):
        km = MiniBatchKMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed + run)
        # One thread: mini-batch k-means runs many tiny parallel steps, and when the cores are
        # busy (training alongside) OpenMP hand-offs made it 10-30x slower than serial.
        with threadpool_limits(limits=1):
            labels = km.fit_predict(data)
        real_hist = np.bincount(labels[:len(real)], minlength=num_clusters)
        fake_hist = np.bincount(labels[len(real):], minlength=num_clusters)
        curve = prd_from_histograms(real_hist, fake_hist, num_angles)
        precision += curve.precision
        recall += curve.recall
    return PRDCurve(precision=precision / num_runs, recall=recall / num_runs)


def _f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> np.ndarray:
    denom = beta ** 2 * precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + beta ** 2) * precision * recall / denom
    return np.where(denom > 0, f, 0.0)


def prd_f_beta(curve: PRDCurve, beta: float = 8) -> tuple[float, float]:
    """(F_beta, F_1/beta), each the maximum over the curve, as in the paper.

    With beta = 8, F_8 mostly rewards recall (mode coverage) and F_1/8 precision (sample
    quality); a model with both near 1 matches the reference distribution.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    p = np.asarray(curve.precision, dtype=np.float64)
    r = np.asarray(curve.recall, dtype=np.float64)
    return float(_f_beta(p, r, beta).max()), float(_f_beta(p, r, 1.0 / beta).max())


def plot_prd(curves: dict, path, title: str | None = None) -> str:
    """Plot named PRD curves (recall on x, precision on y) to an image file; returns the path."""
    # A bare Figure with the Agg canvas: no pyplot, so no global backend or figure state is
    # touched (other code in the process may use pyplot).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(curve.recall, curve.precision, label=str(name), linewidth=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (beta)")
    ax.set_ylabel("precision (alpha)")
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        make_folder(directory)
    save_figure(fig, path)
    return path
