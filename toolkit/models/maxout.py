"""Maxout discriminator, after the MNIST discriminator of Goodfellow et al. 2014 (GAN paper).

flatten -> depth x [Maxout(units, cfg.maxout_pieces), norm, Dropout] -> head.
Depth defaults to 2 hidden layers (0 = automatic), units to `cfg.d_width * 4` (256 for the
default width 64; the paper used 240 units with 5 pieces). The paper also dropped inputs;
here dropout (cfg.d_dropout) follows each hidden layer only, as in the other models.

d-norm: none (the paper's choice), group, layer or batch, applied to the maxout outputs;
"instance" is refused because a feature vector has no spatial positions.
Conditioning "concat" appends the one-hot label to the flattened image; "projection" adds
the projection term on the last hidden layer.
"""

from __future__ import annotations

from torch import nn

from gankit.models.blocks import Discriminator, Maxout, d_norm
from gankit.models.mlp import UNITS_PER_WIDTH, hidden_layers


class MaxoutDiscriminator(Discriminator):
    label_input = "vector"

    def __init__(self, cfg, image_shape, num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.depth = hidden_layers(cfg.d_depth, "discriminator")
        units = cfg.d_width * UNITS_PER_WIDTH
        layers, n_in = [nn.Flatten()], self.in_features
        for _ in range(self.depth):
            # Maxout keeps its bias even before a norm: the max of pieces is not a shift.
            layers += [Maxout(n_in, units, cfg.maxout_pieces),
                       d_norm(cfg.d_norm, units, spatial=False, arch="maxout")]
            if cfg.d_dropout > 0:
                layers.append(nn.Dropout(cfg.d_dropout))
            n_in = units
        self.body = nn.Sequential(*layers)
        self._set_head(n_in)
