"""k-NN precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Real set X (N points), fake set Y (M points); r_k(p) is the distance from p to its k-th nearest
OTHER point of its own set, B(p) the open ball of that radius around p:

    precision = 1/M  sum_j [ y_j in some B(x_i) ]        (fakes that look real)
    recall    = 1/N  sum_i [ x_i in some B(y_j) ]        (reals the fakes reach)
    density   = 1/(kM) sum_j #{ i : y_j in B(x_i) }      (how many real balls hold a fake)
    coverage  = 1/N  sum_i [ some y_j in B(x_i) ]         (real balls holding a fake)

The balls are open (strict "<"), so for identical sets each point's ball holds itself and exactly
k-1 others, and all four are exactly 1. Duplicate points can give a zero radius, i.e. an empty ball.

Distances are never held as a full N x M matrix: rows are processed in chunks of squared
distances ||a||^2 + ||b||^2 - 2 a.b (one matrix product per chunk, float32). Everything is
centred on the real mean first, which leaves distances unchanged but keeps the norms small, and
so the cancellation in that formula small. The radii and the cross distances come from the
same routine on the same row chunks, so a real point's k-th neighbour sits exactly on its
radius in both and never counts as inside (what makes identical sets give exactly 1).
"""

from __future__ import annotations

import torch

from .fid import _check_pair

__all__ = ["prdc"]

# Elements per distance block when chunk_size is not given: 2**24 float32 = 64 MiB, so one
# block, its two boolean masks and the top-k buffers stay around 100 MiB at any N, M.
_BLOCK_ELEMENTS = 2 ** 24


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances of rows of `a` to rows of `b` (clamped: round-off can go below 0)."""
    d = torch.addmm(b_sq.unsqueeze(0), a, b.T, alpha=-2.0)
    return d.add_(a_sq.unsqueeze(1)).clamp_min_(0.0)


def _knn_radii_sq(x: torch.Tensor, x_sq: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest other row."""
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        d = _sq_dists(x[start:stop], x_sq[start:stop], x, x_sq)
        rows = torch.arange(stop - start)
        # Exclude the point itself by index, not by "distance 0": round-off can make the
        # self-distance nonzero, and true duplicates must still count as neighbours.
        d[rows, rows + start] = float("inf")
        out[start:stop] = d.topk(k, dim=1, largest=False, sorted=False).values.amax(dim=1)
        del d  # else the next block is allocated while this one is still alive
    return out


def prdc(real_features, fake_features, k: int = 3, chunk_size: int | None = None) -> dict:
    """Precision, recall, density, coverage and F1 (harmonic mean of precision and recall).

    real_features (N, F) and fake_features (M, F): tensors or arrays. k: the neighbour that
    sets each ball's radius (needs N > k and M > k). chunk_size: rows per distance block;
    default chooses it so a block has about 16M entries. Returns a dict of floats.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real, fake = _check_pair(real_features, fake_features, min_rows=k + 1)
    n, m = real.shape[0], fake.shape[0]
    if chunk_size is None:
        chunk = max(1, _BLOCK_ELEMENTS // max(n, m))
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    # Centre in float64 before dropping to float32 (see the module docstring).
    centre = real.mean(dim=0)
    x = (real - centre).to(torch.float32)
    y = (fake - centre).to(torch.float32)
    x_sq = (x * x).sum(dim=1)
    y_sq = (y * y).sum(dim=1)

    real_r = _knn_radii_sq(x, x_sq, k, chunk)
    fake_r = _knn_radii_sq(y, y_sq, k, chunk)

    fake_in_real_ball = torch.zeros(m, dtype=torch.bool)  # precision, per fake point
    real_in_fake_ball = torch.empty(n, dtype=torch.bool)  # recall, per real point
    real_ball_has_fake = torch.empty(n, dtype=torch.bool)  # coverage, per real point
    balls_holding_fakes = 0  # density numerator
    # One pass over real row chunks gives all four: block[i, j] is compared against the
    # real radius of row i and the fake radius of column j.
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        d = _sq_dists(x[start:stop], x_sq[start:stop], y, y_sq)
        inside_real = d < real_r[start:stop].unsqueeze(1)
        balls_holding_fakes += int(torch.count_nonzero(inside_real))  # .sum() would copy to int64
        real_ball_has_fake[start:stop] = inside_real.any(dim=1)
        fake_in_real_ball |= inside_real.any(dim=0)
        del inside_real
        real_in_fake_ball[start:stop] = (d < fake_r.unsqueeze(0)).any(dim=1)
        del d

    precision = fake_in_real_ball.double().mean().item()
    recall = real_in_fake_ball.double().mean().item()
    density = balls_holding_fakes / (k * m)
    coverage = real_ball_has_fake.double().mean().item()
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return dict(precision=precision, recall=recall, density=density, coverage=coverage, f1=f1)
