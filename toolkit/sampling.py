"""Drawing samples from a trained generator."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.latent import build_prior
from toolkit.models import build_discriminator, build_generator
from toolkit.runs import find_checkpoint


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


def read_checkpoint(path, checkpoint: str = "last", device="cpu") -> tuple[dict, Config, dict]:
    """(checkpoint, its config, its data info) from a run folder or checkpoint file."""
    _, ckpt_path = find_checkpoint(Path(path), checkpoint)
    try:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        return ckpt, Config.from_dict(ckpt["config"]), ckpt["data"]
    except (KeyError, RuntimeError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"{ckpt_path} is not a checkpoint of this toolkit ({err})") from None


def load_discriminator(path, checkpoint: str = "last", device="cpu") -> nn.Module:
    """Rebuild D from a run folder or checkpoint file, in eval mode."""
    ckpt, config, info = read_checkpoint(path, checkpoint, device)
    D = build_discriminator(config.model, tuple(info["image_shape"]), info["num_classes"]).to(device)
    D.load_state_dict(ckpt["D"])
    return D.eval()


def load_generator(path, checkpoint: str = "last", ema: bool = True, device="cpu") -> LoadedGenerator:
    """Rebuild G and its prior from a run folder or checkpoint file, in eval mode."""
    ckpt, config, info = read_checkpoint(path, checkpoint, device)
    G = build_generator(config.model, config.latent.latent_dim, tuple(info["image_shape"]),
                        info["num_classes"]).to(device)
    if ema and ckpt.get("ema"):
        # AveragedModel keeps the averaged network under "module." next to a counter.
        G.load_state_dict({k[len("module."):]: v for k, v in ckpt["ema"].items()
                           if k.startswith("module.")})
    else:
        G.load_state_dict(ckpt["G"])
    prior = build_prior(config.latent, config.train.seed).to(device)
    prior.load_state_dict(ckpt["prior"])
    return LoadedGenerator(G.eval(), prior.eval(), config, info["num_classes"],
                           tuple(info["image_shape"]))


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, shape (N, C, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
