"""What `gankit generate` does: a run's (or a released) generator's images in one of its
modes (random samples, optionally rejection-sampled or class-filtered; latent grids,
lerp/slerp paths, Dirichlet mixtures, class grids), written as a .png grid or a .npz.

Loading a generator and drawing plain samples is toolkit/sampling.py, below this module.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from gankit import interpolation
from gankit.class_filter import sample_agreeing
from gankit.data import load_data
from gankit.errors import UserError
from gankit.evaluate import draw_samples
from gankit.files import grid_png, make_folder, write_bytes
from gankit.sampling import check_latent_scale, load_discriminator, load_generator


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, shape (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


GENERATE_MODES = ("random", "grid", "lerp", "slerp", "dirichlet", "classes")


def image_file(out: Path) -> Path:
    """An output file of `gankit generate`, checked before any sampling is spent on it."""
    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out}")
    return out


def generate(run: str, mode: str = "random", num: int = 64, checkpoint: str = "last",
             sigma: Optional[float] = None, truncation: Optional[float] = None,
             label: Optional[int] = None, seed: int = 0, no_ema: bool = False, nrow: int = 8,
             anchors: int = 4, steps: int = 8, span: float = 2.0, alpha: float = 1.0,
             drs: bool = False, drs_target_rate: float = 0.2,
             drs_percentile: Optional[float] = None, class_filter: bool = False,
             min_confidence: float = 0.0) -> tuple[Tensor, Optional[Tensor], int]:
    """Images of a run's (or a released) generator in one of GENERATE_MODES (the options are
    `gankit generate`'s): (images in [-1, 1], labels or None, images per grid row)."""
    if num <= 0 or anchors < 2 or steps < 2 or nrow <= 0:
        raise UserError("--num and --nrow must be positive, --anchors and --steps at least 2")
    check_latent_scale(sigma, truncation)
    if mode not in GENERATE_MODES:
        raise UserError(f"unknown --mode '{mode}' (choose from {', '.join(GENERATE_MODES)})")
    if (drs or class_filter) and mode != "random":
        raise UserError("--drs and --class-filter apply to --mode random")
    if drs and class_filter:
        raise UserError("choose one of --drs and --class-filter")
    if mode == "classes" and label is not None:
        raise UserError("--mode classes draws every class (a column each); drop --label, or use "
                        "--mode random --label N for one class")
    gen = load_generator(run, checkpoint, ema=not no_ema)
    if label is not None and not gen.num_classes:
        raise UserError("--label needs a conditional model; this run's generator is unconditional")
    if label is not None and not 0 <= label < gen.num_classes:
        raise UserError(f"--label {label} is not a class of this model (0 to {gen.num_classes - 1})")
    if gen.num_classes and label is None and mode in ("grid", "lerp", "slerp", "dirichlet"):
        raise UserError(f"--mode {mode} moves through one class's latent space on a conditional "
                        f"model: pass --label N (0 to {gen.num_classes - 1})")
    if mode == "random":
        if drs:
            data = load_data(gen.config.data)  # the run's own training images, never the reference
            images, labels, info = draw_samples(gen, num, seed, sigma, truncation, drs=True,
                                                D=load_discriminator(run, checkpoint),
                                                drs_target_rate=drs_target_rate,
                                                drs_percentile=drs_percentile,
                                                calibration=(data.train_x, data.train_y))
            logging.getLogger("gankit").info(
                "rejection sampling: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in info.items()))
        elif class_filter:
            wanted = (torch.full((num,), label) if label is not None else
                      torch.randint(gen.num_classes or 1, (num,), generator=torch.Generator().manual_seed(seed)))
            images, labels, stats = sample_agreeing(gen, load_discriminator(run, checkpoint), wanted,
                                                    seed, min_confidence, sigma=sigma,
                                                    truncation=truncation)
            logging.getLogger("gankit").info("class filter: kept %d of %d drawn (acceptance %.3f)",
                                             stats.kept, stats.drawn, stats.acceptance)
        else:
            wanted = None if label is None else torch.full((num,), label)
            images, labels = gen.sample(num, seed, sigma, truncation, wanted)
        return images, labels, nrow
    z, labels, nrow = exploration_latents(gen, mode, num, seed, sigma, truncation, nrow, anchors,
                                          steps, span, alpha)
    if gen.num_classes and labels is None:
        labels = torch.full((len(z),), label)
    with torch.no_grad():
        images = torch.cat([gen.G(z[i:i + 500], None if labels is None else labels[i:i + 500])
                            for i in range(0, len(z), 500)])
    return images, labels, nrow


def exploration_latents(gen, mode: str, num: int, seed: int, sigma, truncation, nrow: int,
                        anchors: int, steps: int, span: float, alpha: float) -> tuple:
    """(z, labels, images per row) for the latent-exploration modes."""
    rng = torch.Generator().manual_seed(seed)
    sample = (lambda n: gen.prior.sample(n, generator=rng, sigma=sigma, truncation=truncation,
                                         device="cpu"))
    if mode == "grid":
        return interpolation.latent_grid(sample(1)[0], steps, steps, span, rng), None, steps
    if mode in ("lerp", "slerp"):
        return interpolation.interpolate_path(sample(anchors), steps, method=mode), None, steps
    if mode == "dirichlet":
        z, _ = interpolation.dirichlet_mix(sample(anchors), num, alpha, rng, renormalize=True)
        return z, None, nrow
    if not gen.num_classes:
        raise UserError("--mode classes needs a conditional model")
    # --num counts images here too: whole rows of one image per class.
    rows = max(1, num // gen.num_classes)
    if rows * gen.num_classes != num:
        logging.getLogger("gankit").info("--mode classes: %d rows of %d classes (%d images)", rows,
                                         gen.num_classes, rows * gen.num_classes)
    z, labels = interpolation.class_grid(sample(rows), gen.num_classes)
    return z, labels, gen.num_classes


def write_images(images: Tensor, labels: Optional[Tensor], nrow: int, out: Path,
                 force: bool = False) -> None:
    """A .png grid, or a .npz of uint8 images `x` (and labels `y`); an existing file is
    replaced only with `force`."""
    out = image_file(out)
    make_folder(out.parent)
    if out.suffix == ".npz":
        arrays = {"x": to_uint8(images)}
        if labels is not None:
            arrays["y"] = labels.cpu().numpy()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        data = buffer.getvalue()
    else:
        data = grid_png(images, nrow)
    write_bytes(out, data, "replace" if force else "refuse")
