"""DCGAN-style convolutional generator and discriminator (Radford et al. 2016).

Depth is the number of x2 up/downsampling stages. Depth 0 (the default) picks the most
stages that keep whole-number map sizes and a smallest map of at least 4x4: 28x28 -> 2
stages (7x7), 32x32 -> 3 (4x4), 64x64 -> 4 (4x4). An explicit depth must divide H and W
exactly and leave a smallest map of at least 2x2.

Width is the base channel count: G starts with width * 2**(depth-1) channels and halves them
each stage down to `width`; D starts with `width` and doubles them each stage.
"""

from __future__ import annotations

from torch import nn

from gankit.errors import ConfigError
from gankit.models.blocks import (Discriminator, Generator, d_norm, g_norm,
                                   norm_cancels_bias)

AUTO_MIN_SIZE = 4  # smallest map that automatic depth leaves (the DCGAN paper's 4x4)
EXPLICIT_MIN_SIZE = 2  # below this the conv stack degenerates (and instance norm cannot run)


def auto_depth(height: int, width: int) -> int:
    """Largest n with H and W divisible by 2**n and H / 2**n, W / 2**n >= 4."""
    n = 0
    def fits(stages: int) -> bool:
        scale = 2 ** stages
        return all(s % scale == 0 and s // scale >= AUTO_MIN_SIZE for s in (height, width))

    while fits(n + 1):
        n += 1
    return n


def resolve_depth(requested: int, image_shape, who: str) -> int:
    """The number of stages for an image of `image_shape`: `requested`, or automatic if 0."""
    _, height, width = image_shape
    if requested == 0:
        depth = auto_depth(height, width)
        if depth == 0:
            raise ConfigError(
                f"the dcgan {who} cannot fit {height}x{width} images: it needs sizes divisible "
                f"by 2 with at least {2 * AUTO_MIN_SIZE} pixels; resize the images "
                f"(--image-size) or use the mlp architecture")
        return depth
    if requested < 0:
        raise ConfigError(f"{who} depth must be non-negative, got {requested}")
    scale = 2 ** requested
    if height % scale or width % scale or min(height, width) // scale < EXPLICIT_MIN_SIZE:
        best = auto_depth(height, width)
        raise ConfigError(
            f"dcgan {who} depth {requested} does not fit {height}x{width} images: "
            f"{requested} x2 stages need H and W divisible by {scale} and a smallest map of at "
            f"least {EXPLICIT_MIN_SIZE}x{EXPLICIT_MIN_SIZE}"
            + (f" (automatic depth would be {best}; pass 0)" if best else ""))
    return requested


class DCGANGenerator(Generator):
    """Linear(z [+ label embedding]) -> (width * 2**(depth-1), H/2**depth, W/2**depth) map
    -> depth x [ConvTranspose2d(4, 2, 1), norm, ReLU] -> Conv2d(3x3) to C channels -> Tanh."""

    def __init__(self, cfg, latent_dim: int, image_shape, num_classes: int):
        super().__init__(cfg, latent_dim, image_shape, num_classes)
        channels, height, width = self.image_shape
        self.depth = resolve_depth(cfg.g_depth, self.image_shape, "generator")
        start_h, start_w = height // 2 ** self.depth, width // 2 ** self.depth
        # Channels entering each stage, halving down to the base width.
        widths = [cfg.g_width * 2 ** max(self.depth - 1 - i, 0) for i in range(self.depth + 1)]
        use_bias = not norm_cancels_bias(cfg.g_norm)

        layers = [
            nn.Linear(self.input_dim, widths[0] * start_h * start_w, bias=use_bias),
            nn.Unflatten(1, (widths[0], start_h, start_w)),
            g_norm(cfg.g_norm, widths[0], spatial=True),
            nn.ReLU(),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=use_bias),
                g_norm(cfg.g_norm, c_out, spatial=True),
                nn.ReLU(),
            ]
        # A stride-1 conv maps to image channels, so every upsampling stage keeps its norm.
        layers += [nn.Conv2d(widths[-1], channels, kernel_size=3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)


class DCGANDiscriminator(Discriminator):
    """depth x [Conv2d(4, 2, 1), norm (none on the first, as in DCGAN), LeakyReLU(0.2),
    Dropout] -> flatten -> head (Linear to one score, + projection term when conditional).

    Conditioning "concat" joins one constant plane per class to the input channels.
    """

    label_input = "planes"

    def __init__(self, cfg, image_shape, num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        _, height, width = self.image_shape
        self.depth = resolve_depth(cfg.d_depth, self.image_shape, "discriminator")
        layers = []
        c_in = self.in_channels
        for i in range(self.depth):
            c_out = cfg.d_width * 2 ** i
            norm = nn.Identity() if i == 0 else d_norm(cfg.d_norm, c_out, spatial=True)
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1,
                          bias=i == 0 or not norm_cancels_bias(cfg.d_norm)),
                norm,
                nn.LeakyReLU(0.2),
            ]
            if cfg.d_dropout > 0:
                layers.append(nn.Dropout(cfg.d_dropout))
            c_in = c_out
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self._set_head(c_in * (height // 2 ** self.depth) * (width // 2 ** self.depth))
