"""Fully connected generator and discriminator.

Hidden layers have `width * 4` units (`cfg.g_width` / `cfg.d_width`), so the default width
64 gives 256-unit layers, a usual size for MNIST-scale MLP GANs; the same width option then
reads sensibly for both the conv models (channels) and these. Depth is the number of hidden
layers, 2 when 0 (automatic).

Generator: depth x [Linear, norm (batch | none), ReLU] -> Linear -> Tanh -> image shape.
Discriminator: flatten -> depth x [Linear, norm, LeakyReLU(0.2), Dropout] -> head.
The discriminator accepts d-norm none, group, layer (GroupNorm over the features, i.e.
LayerNorm) and batch; "instance" is refused because a feature vector has no spatial
positions to normalize over.
"""

from __future__ import annotations

import math

from torch import nn

from gankit.errors import ConfigError
from gankit.models.blocks import (Discriminator, Generator, d_norm, g_norm,
                                   norm_cancels_bias)

DEFAULT_DEPTH = 2
UNITS_PER_WIDTH = 4


def hidden_layers(requested: int, who: str) -> int:
    if requested < 0:
        raise ConfigError(f"{who} depth must be non-negative, got {requested}")
    return requested or DEFAULT_DEPTH


class MLPGenerator(Generator):
    def __init__(self, cfg, latent_dim: int, image_shape, num_classes: int):
        super().__init__(cfg, latent_dim, image_shape, num_classes)
        self.depth = hidden_layers(cfg.g_depth, "generator")
        units = cfg.g_width * UNITS_PER_WIDTH
        layers, n_in = [], self.input_dim
        for _ in range(self.depth):
            layers += [
                nn.Linear(n_in, units, bias=not norm_cancels_bias(cfg.g_norm)),
                g_norm(cfg.g_norm, units, spatial=False),
                nn.ReLU(),
            ]
            n_in = units
        layers += [
            nn.Linear(n_in, math.prod(self.image_shape)),
            nn.Tanh(),
            nn.Unflatten(1, self.image_shape),
        ]
        self.body = nn.Sequential(*layers)


class MLPDiscriminator(Discriminator):
    """Conditioning "concat" appends the one-hot label to the flattened image."""

    label_input = "vector"

    def __init__(self, cfg, image_shape, num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.depth = hidden_layers(cfg.d_depth, "discriminator")
        units = cfg.d_width * UNITS_PER_WIDTH
        layers, n_in = [nn.Flatten()], self.in_features
        for _ in range(self.depth):
            layers += [
                nn.Linear(n_in, units, bias=not norm_cancels_bias(cfg.d_norm)),
                d_norm(cfg.d_norm, units, spatial=False, arch="mlp"),
                nn.LeakyReLU(0.2),
            ]
            if cfg.d_dropout > 0:
                layers.append(nn.Dropout(cfg.d_dropout))
            n_in = units
        self.body = nn.Sequential(*layers)
        self._set_head(n_in)
