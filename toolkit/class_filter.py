"""Class-head filtering: keep the generated images whose label the run's own auxiliary
classifier (D's class head, `--aux-classifier`) reads as the label G was asked for.

A conditional G asked for a 4 draws some images that read as a 9; a classifier trained on
them learns that label noise. D's class head learned the real labels (under DP, inside each
example's clipped loss), so filtering G's samples with it reads only D, G and fresh samples:
post-processing of the private D, with no privacy cost and no real data. An image rejected
for a label is replaced by a fresh draw for the same label, so the labels (balanced, say)
stay exactly as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from gankit.errors import UserError
from gankit.sampling import LoadedGenerator, eval_mode

# Seeds of the successive redraws, far apart so that a caller's nearby seeds (seed, seed + 1,
# ...) never draw the same latents as another call's redraw.
REDRAW_SEED_STRIDE = 1_000_003


@dataclass
class FilterStats:
    drawn: int
    kept: int
    min_confidence: float

    @property
    def acceptance(self) -> float:
        return self.kept / self.drawn if self.drawn else float("nan")


def has_class_head(D: nn.Module) -> bool:
    """Whether D has the auxiliary classifier (models' `add_class_head`)."""
    return getattr(getattr(D, "head", None), "classes", None) is not None


@torch.no_grad()
def class_probabilities(D: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> Tensor:
    """D's class-head softmax for each image (D conditioned on the image's label)."""
    if not has_class_head(D):
        raise UserError("class-head filtering needs a discriminator with a class head "
                        "(a run trained with --aux-classifier)")
    device = next(D.parameters()).device
    out = []
    with eval_mode(D):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            out.append(D(x, y, classes=True)[1].softmax(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_agreeing(gen: LoadedGenerator, D: nn.Module, labels: Tensor, seed: int = 0,
                    min_confidence: float = 0.0, max_draws: int = 50, sigma: Optional[float] = None,
                    truncation: Optional[float] = None, progress: bool = False) -> tuple[Tensor, Tensor, FilterStats]:
    """One image per entry of `labels`, each one D's class head reads as its label (its
    argmax, with at least `min_confidence` probability). Reproducible by seed. Refuses, naming
    the labels, when some label is still unfilled after `max_draws` draws."""
    if not gen.num_classes:
        raise UserError("class-head filtering needs a conditional generator")
    if not 0 <= min_confidence < 1:
        raise UserError(f"min-confidence must be in [0, 1), got {min_confidence}")
    labels = labels.cpu()
    images = torch.empty((len(labels), *gen.image_shape))
    missing = torch.arange(len(labels))
    drawn = 0
    for draw in range(max_draws):
        if not len(missing):
            break
        x, _ = gen.sample(len(missing), seed=seed + draw * REDRAW_SEED_STRIDE,
                          sigma=sigma, truncation=truncation, labels=labels[missing],
                          progress=progress and draw == 0)
        x = x.cpu()
        drawn += len(missing)
        probs = class_probabilities(D, x, labels[missing])
        confidence, read = probs.max(1)
        ok = (read == labels[missing]) & (confidence >= min_confidence)
        images[missing[ok]] = x[ok]
        missing = missing[~ok]
    if len(missing):
        unfilled = sorted(set(labels[missing].tolist()))
        raise UserError(f"D's class head accepted too few images of labels {unfilled} in "
                        f"{max_draws} draws; lower --min-confidence or sample without the filter")
    return images, labels, FilterStats(drawn, len(labels), min_confidence)
