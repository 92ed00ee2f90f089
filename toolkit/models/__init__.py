"""Generators and discriminators, chosen by name from `ModelConfig`.

Every generator is called as `G(z, y=None)` and returns images (N, C, H, W) in [-1, 1];
every discriminator as `D(x, y=None)` and returns raw scores (N,) (with a class head,
`D(x, y, classes=True)` returns (scores, class logits)). `y` holds class indices
and is required by conditional models (ValueError without it); unconditional ones ignore it.
Build models through these functions: they also initialize the weights and add spectral
norm, which the classes alone do not.
"""

from __future__ import annotations

import torch
from torch import nn

from gankit.config import Config, ModelConfig
from gankit.errors import ConfigError
from gankit.models.blocks import GaussianNoise, apply_spectral_norm, init_weights
from gankit.models.cdcgan import CDCGANDiscriminator, CDCGANGenerator
from gankit.models.dcgan import DCGANDiscriminator, DCGANGenerator
from gankit.models.maxout import MaxoutDiscriminator
from gankit.models.mlp import MLPDiscriminator, MLPGenerator

GENERATORS = {"dcgan": DCGANGenerator, "mlp": MLPGenerator, "cdcgan": CDCGANGenerator}
DISCRIMINATORS = {
    "dcgan": DCGANDiscriminator,
    "cdcgan": CDCGANDiscriminator,
    "mlp": MLPDiscriminator,
    "maxout": MaxoutDiscriminator,
}

__all__ = [
    "GENERATORS", "DISCRIMINATORS", "GaussianNoise", "build_generator", "build_discriminator",
    "discriminator_for",
]


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ConfigError(f"unknown {what} '{name}' (choose from {', '.join(registry)})")
    return registry[name]


def _check_image_shape(image_shape) -> tuple:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"image shape must be (channels, height, width), got {image_shape}")
    return shape


def build_generator(cfg: ModelConfig, latent_dim: int, image_shape: tuple[int, int, int],
                    num_classes: int) -> nn.Module:
    """`num_classes` is 0 for unlabelled data; a conditional model needs at least 2."""
    model = _lookup(GENERATORS, cfg.g_arch, "generator")(
        cfg, latent_dim, _check_image_shape(image_shape), num_classes)
    init_weights(model)
    # Channels-last conv weights make the convolutions, BatchNorm and ReLU run on NHWC maps:
    # 1.7x faster for the DP recipe's G (width 16, batch 1024) forward and backward on one
    # CPU thread (benchmarks/generator_layout.py), where G is half of a training step. Only
    # the layout changes; checkpoints store the usual contiguous tensors.
    return model.to(memory_format=torch.channels_last)


def build_discriminator(cfg: ModelConfig, image_shape: tuple[int, int, int],
                        num_classes: int, class_head: bool = False) -> nn.Module:
    """`D.noise` is the instance-noise layer (anneal it through `D.noise.std`) or None.
    `class_head` adds the auxiliary classifier (`--aux-classifier`)."""
    model = _lookup(DISCRIMINATORS, cfg.d_arch, "discriminator")(
        cfg, _check_image_shape(image_shape), num_classes)
    if class_head:
        model.add_class_head()
    init_weights(model)  # before spectral norm, which reparametrizes the weights it finds
    if cfg.spectral_norm:
        apply_spectral_norm(model)
    return model


def discriminator_for(config: Config, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The run's D: its model options, with the class head when the objective uses one."""
    return build_discriminator(config.model, image_shape, num_classes,
                               class_head=config.objective.aux_classifier > 0)


# Weights, their gradients and Adam's two moments, plus an EMA copy of G when kept.
TRAINING_COPIES = 4


def check_training_memory(config: Config, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Refuse networks whose weights and optimizer state alone exceed --max-model-gb, before
    any is allocated: they are counted on the meta device, which holds no memory."""
    with torch.device("meta"):
        G = build_generator(config.model, config.latent.latent_dim, image_shape, num_classes)
        D = discriminator_for(config, image_shape, num_classes)
    g_params = sum(p.numel() for p in G.parameters())
    d_params = sum(p.numel() for p in D.parameters())
    copies = TRAINING_COPIES * (g_params + d_params) + (g_params if config.optim.ema_decay else 0)
    need_gb = copies * 4 / 1e9
    if need_gb > config.model.max_model_gb:
        raise ConfigError(f"G ({g_params:,} weights) and D ({d_params:,}) need {need_gb:.3g} GB for "
                          f"training state, above --max-model-gb {config.model.max_model_gb:g}; use "
                          "smaller widths or depths, or raise --max-model-gb if the machine has it")
