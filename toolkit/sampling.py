"""Drawing samples from a trained generator."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from gankit.config import Config, privacy_facts, validate
from gankit.errors import ConfigError, UserError
from gankit.files import grid_png, make_folder, shorten, write_bytes
from gankit.latent import build_prior
from gankit.models import build_generator, discriminator_for
from gankit.runs import find_checkpoint
from gankit.statefile import load_state


@contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode (no instance noise, dropout or batch statistics), restored afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@dataclass
class LoadedGenerator:
    G: nn.Module
    prior: nn.Module
    config: Config
    num_classes: int
    image_shape: tuple
    # What the run protects, as its checkpoint records it; a generator still in training
    # gets it from the same function that writes the record.
    privacy: Optional[dict] = None

    def __post_init__(self):
        if self.privacy is None:
            self.privacy = privacy_facts(self.config)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, sigma: Optional[float] = None,
               truncation: Optional[float] = None, labels: Optional[Tensor] = None,
               batch_size: int = 500, progress: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """n images in [-1, 1] (and their labels for a conditional G), reproducible by seed."""
        from tqdm.auto import tqdm

        device = next(self.G.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        if self.num_classes and labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=rng, device=device)
        images = []
        with eval_mode(self.G):
            for start in tqdm(range(0, n, batch_size), desc="generating", unit="batch",
                              disable=None if progress else True, leave=False):
                m = min(batch_size, n - start)
                z = self.prior.sample(m, generator=rng, sigma=sigma, truncation=truncation,
                                      device=device)
                y = None if labels is None else labels[start:start + m].to(device)
                images.append(self.G(z, y))
        return torch.cat(images), labels


RELEASE_FILE = "generator.safetensors"
MAX_IMAGE_SIDE = 1024  # as --image-size
MAX_CLASSES = 1000  # as a dataset's labels (gankit.data)


def read_checkpoint(path, checkpoint: str = "last", device="cpu") -> tuple[dict, Config, dict]:
    """(checkpoint, its config, its data info) from a run folder, a checkpoint file or a
    released generator's folder."""
    path = Path(path)
    if path.is_dir() and (path / RELEASE_FILE).is_file():
        ckpt_path = path / RELEASE_FILE
    else:
        _, ckpt_path = find_checkpoint(path, checkpoint)
    ckpt = load_state(ckpt_path, device)  # runs no code, whatever the file holds
    if not (isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("data"), dict)):
        raise UserError(f"{ckpt_path} is not a checkpoint of this toolkit (no config or data entry)")
    try:
        config = Config.from_dict(ckpt["config"])
        # The same rules as a user's options: a crafted latent size of 1e9 is refused here,
        # before any network is built from it.
        validate(config)
    except ConfigError as err:
        raise UserError(f"{ckpt_path} holds an invalid config: {err}") from None
    return ckpt, config, data_info(ckpt["data"], ckpt_path)


def data_info(info: dict, where) -> dict:
    """A checkpoint's record of its data (image shape, classes), checked before use."""
    shape, classes = info.get("image_shape"), info.get("num_classes")
    whole = (lambda v: isinstance(v, int) and not isinstance(v, bool))
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(map(whole, shape))
            and shape[0] in (1, 3) and all(1 <= side <= MAX_IMAGE_SIDE for side in shape[1:])):
        raise UserError(f"{where}: image_shape must be (channels 1 or 3, height, width) with "
                        f"sides up to {MAX_IMAGE_SIDE}, got {shorten(repr(shape))}")
    if not (whole(classes) and 0 <= classes <= MAX_CLASSES):
        raise UserError(f"{where}: num_classes must be 0..{MAX_CLASSES}, got {shorten(repr(classes))}")
    return {**info, "image_shape": tuple(shape)}


def load_weights(module: nn.Module, weights, what: str, where) -> None:
    """Weights from a checkpoint into a network its config describes: one line if they do
    not fit, and non-finite weights (a diverged run) refused rather than drawn as black."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"{where}: its {what} weights do not fit the network its config "
                        f"describes ({shorten(str(err).splitlines()[0] if str(err) else type(err).__name__, 160)})") from None
    bad = [name for name, t in module.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{where}: its {what} holds non-finite weights ({bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); the run diverged "
                        "before this checkpoint, so it cannot draw images")


def load_discriminator(path, checkpoint: str = "last", device="cpu") -> nn.Module:
    """Rebuild D from a run folder or checkpoint file, in eval mode."""
    ckpt, config, info = read_checkpoint(path, checkpoint, device)
    if "D" not in ckpt:
        raise UserError(f"{path} holds a released generator without its discriminator; "
                        "rejection sampling needs the run's own checkpoint")
    D = discriminator_for(config, tuple(info["image_shape"]), info["num_classes"]).to(device)
    load_weights(D, ckpt["D"], "discriminator", path)
    return D.eval()


def load_generator(path, checkpoint: str = "last", ema: bool = True, device="cpu") -> LoadedGenerator:
    """Rebuild G and its prior from a run folder, checkpoint file or released generator, in
    eval mode."""
    ckpt, config, info = read_checkpoint(path, checkpoint, device)
    return generator_from(ckpt, config, info, ema, device, where=path)


def generator_from(ckpt: dict, config: Config, info: dict, ema: bool = True,
                   device="cpu", where="the checkpoint") -> LoadedGenerator:
    G = build_generator(config.model, config.latent.latent_dim, tuple(info["image_shape"]),
                        info["num_classes"]).to(device)
    if ema and isinstance(ckpt.get("ema"), dict) and ckpt["ema"]:  # a released G is already the EMA one, if any
        # AveragedModel keeps the averaged network under "module." next to a counter.
        load_weights(G, {k[len("module."):]: v for k, v in ckpt["ema"].items()
                         if isinstance(k, str) and k.startswith("module.")}, "generator (EMA)", where)
    else:
        load_weights(G, ckpt.get("G"), "generator", where)
    prior = build_prior(config.latent, config.train.seed).to(device)
    load_weights(prior, ckpt.get("prior"), "latent prior", where)
    # Checkpoints converted from gankit < 0.2 predate the record: derive it once here.
    privacy = ckpt.get("privacy") if isinstance(ckpt.get("privacy"), dict) else privacy_facts(config)
    return LoadedGenerator(G.eval(), prior.eval(), config, info["num_classes"],
                           tuple(info["image_shape"]), privacy)


def export_generator(path, out: Path, checkpoint: str = "last", ema: bool = True,
                     force: bool = False) -> Path:
    """Write the generator alone (weights, prior, the config that rebuilds it, what the run
    protects and the epsilon it spent) to `out/generator.safetensors`: what a private run
    may release, since G is post-processing of the private D. No discriminator, optimizer
    or RNG state (these are not covered by the release, or would help an attacker)."""
    from gankit.runs import RunDir
    from gankit.statefile import save_state

    ckpt, config, info = read_checkpoint(path, checkpoint)
    gen = generator_from(ckpt, config, info, ema=ema)
    history = RunDir(Path(path)).history() if Path(path).is_dir() else []
    last = history[-1] if history else {}
    spent = {k: last[k] for k in ("epsilon", "epsilon_rdp", "epsilon_prv", "delta",
                                  "accountant", "noise_multiplier", "dp_steps") if k in last}
    out = make_folder(Path(out))
    released = gen.config.to_dict()
    # The seed drives the private run's sampling and noise: it is not released.
    released["train"]["seed"] = 0
    return save_state({"released": True, "config": released, "data": info,
                       "privacy": gen.privacy, "spent": spent, "G": gen.G.state_dict(),
                       "prior": gen.prior.state_dict(),
                       "epoch": (ckpt["state"] if isinstance(ckpt.get("state"), dict) else {}).get("epoch")},
                      out / RELEASE_FILE, "replace" if force else "refuse")


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, shape (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


# --- what `gankit generate` does ------------------------------------------------------------

GENERATE_MODES = ("random", "grid", "lerp", "slerp", "dirichlet", "classes")


def check_latent_scale(sigma: Optional[float], truncation: Optional[float]) -> None:
    """--sigma and --truncation as a user gives them: a latent scale must be positive and a
    truncation threshold (0 = off) not negative."""
    if sigma is not None and not sigma > 0:
        raise UserError(f"--sigma must be positive, got {sigma}")
    if truncation is not None and not truncation >= 0:
        raise UserError(f"--truncation must be >= 0 (0 = off), got {truncation}")


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
            from gankit.data import load_data
            from gankit.evaluate import draw_samples

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
            from gankit.class_filter import sample_agreeing

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
    import logging

    from gankit import interpolation

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
    import io

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
