"""Loading a trained generator (and its discriminator) and drawing samples from it.

What `gankit generate` makes of them (modes, grids, files) is toolkit/generate.py."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from gankit.config import RANGES, Config, privacy_facts, validate
from gankit.data import MAX_CLASSES
from gankit.errors import ConfigError, UserError
from gankit.files import make_folder, shorten
from gankit.latent import build_prior
from gankit.models import build_generator, discriminator_for
from gankit.runs import RunDir, find_checkpoint
from gankit.statefile import load_state, save_state


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
MAX_IMAGE_SIDE = int(RANGES["image_size"].high)  # what --image-size allows


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
    return discriminator_from(ckpt, config, info, device, where=path)


def discriminator_from(ckpt: dict, config: Config, info: dict, device="cpu",
                       where="the checkpoint") -> nn.Module:
    """D from a checkpoint already read (`read_checkpoint`), in eval mode."""
    if "D" not in ckpt:
        raise UserError(f"{where} holds a released generator without its discriminator; "
                        "rejection sampling and the audit need the run's own checkpoint")
    D = discriminator_for(config, tuple(info["image_shape"]), info["num_classes"]).to(device)
    load_weights(D, ckpt["D"], "discriminator", where)
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


def check_latent_scale(sigma: Optional[float], truncation: Optional[float]) -> None:
    """--sigma and --truncation as a user gives them: a latent scale must be positive and a
    truncation threshold (0 = off) not negative."""
    if sigma is not None and not sigma > 0:
        raise UserError(f"--sigma must be positive, got {sigma}")
    if truncation is not None and not truncation >= 0:
        raise UserError(f"--truncation must be >= 0 (0 = off), got {truncation}")
