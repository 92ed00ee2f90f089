"""Scores from a classifier's outputs on generated samples.

classifier_score: the Inception Score (Salimans et al. 2016) with any classifier,
exp(E_x KL(p(y|x) || p(y))). It is 1 when every prediction is the same distribution and C (the
number of classes) when predictions are confident and spread evenly over all C classes.

mode_coverage: the class histogram of predicted labels against the uniform one; a collapsed
generator covers few classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["classifier_score", "mode_coverage"]


def classifier_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(mean_x KL(p(y|x) || p(y))).

    logits: (N, C) unnormalised scores. p(y) is the mean of p(y|x) within each part (as in the
    original score, so the spread says how stable it is at that sample size). Computed in log
    space in float64 (log_softmax, logsumexp), so confident logits do not underflow to log 0.
    """
    t = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, C), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("logits contain NaN or infinite values")
    splits = int(splits)
    if not 1 <= splits <= t.shape[0]:
        raise ValueError(f"splits must be in [1, N={t.shape[0]}], got {splits}")
    log_p = torch.log_softmax(t, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits, dim=0):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def mode_coverage(predicted_labels, num_classes: int) -> dict:
    """Class histogram of predicted labels and its distance from uniform.

    Returns counts and fractions (lists, one entry per class), kl_from_uniform = KL(hist || U)
    (in nats; 0 when uniform, log C when collapsed onto one class; this direction stays finite
    when classes are missing), tv_to_uniform = 1/2 sum |f_c - 1/C| (0 to 1 - 1/C), and covered:
    the number of classes holding at least 10% of the uniform share 1/C.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    labels = torch.as_tensor(predicted_labels).detach().cpu().reshape(-1)
    if labels.numel() == 0:
        raise ValueError("predicted_labels is empty")
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("predicted_labels must be integers")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"predicted_labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    n = int(counts.sum())
    fractions = counts / n
    nonzero = fractions > 0
    kl = float(np.sum(fractions[nonzero] * np.log(fractions[nonzero] * num_classes)))
    tv = float(0.5 * np.abs(fractions - 1.0 / num_classes).sum())
    # In integers: count / n >= 0.1 / C, free of float rounding at the threshold.
    covered = int(np.sum(10 * num_classes * counts >= n))
    return dict(counts=[int(c) for c in counts], fractions=[float(f) for f in fractions],
                num_samples=n, kl_from_uniform=max(kl, 0.0), tv_to_uniform=tv, covered=covered)


def within_class_spread(images, labels) -> float:
    """Per-pixel standard deviation across the images of one label, averaged over pixels and
    then over the labels present (at least 2 images each). Near 0 when a conditional G ignores
    z and draws one image per class; compare it with the real images' value."""
    images = torch.as_tensor(images).detach().float().cpu().flatten(1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    spreads = [images[labels == c].std(0).mean().item() for c in labels.unique().tolist()
               if int((labels == c).sum()) >= 2]
    if not spreads:
        raise ValueError("within-class spread needs a label with at least 2 images")
    return float(np.mean(spreads))
