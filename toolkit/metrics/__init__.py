"""Sample-quality metrics: pure functions of feature tensors (N, F), logits or labels.

Features come from any network (in this project, the penultimate layer of a small MNIST
classifier); nothing here loads a model or touches images, so every metric can be checked on
data with known answers.

- fid.py: `frechet_distance` (closed form on Gaussian parameters), `fid` and `kid` (torchmetrics'
  FID/KID run on precomputed features through an identity feature module).
- prdc.py: `prdc`: k-NN precision/recall (Kynkaanniemi et al. 2019), density/coverage
  (Naeem et al. 2020) and their F1, in memory-bounded chunks.
- prd.py: `prd` curves (Sajjadi et al. 2018) from k-means histograms, `prd_from_histograms`,
  `prd_f_beta` (F_8, F_1/8), `plot_prd`, and the `PRDCurve` record.
- scores.py: `classifier_score` (Inception-Score-style, from logits) and `mode_coverage`
  (class histogram vs uniform, from predicted labels).
"""

from .fid import fid, frechet_distance, kid
from .prd import PRDCurve, plot_prd, prd, prd_f_beta, prd_from_histograms
from .prdc import prdc
from .scores import classifier_score, mode_coverage, within_class_spread

__all__ = [
    "frechet_distance", "fid", "kid",
    "prdc",
    "PRDCurve", "prd", "prd_from_histograms", "prd_f_beta", "plot_prd",
    "classifier_score", "mode_coverage", "within_class_spread",
]
