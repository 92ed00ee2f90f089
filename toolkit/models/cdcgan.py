"""The class-conditional DCGAN of the DP-GAN record (Bie et al. 2023, "Private GANs,
revisited"), for 28x28 images.

Labels enter both networks as one-hot maps through a parallel branch, and neither network
has a normalization layer: per-sample gradients need none in D, and the record found G
needs none either.

    G: z (latent, 1x1) -> ConvT(4, 1, 0) -> 2w x 4x4  }  joined: 4w x 4x4
       y one-hot (1x1) -> ConvT(4, 1, 0) -> 2w x 4x4  }
       -> ConvT(3, 2, 1) 2w x 7x7 -> ConvT(4, 2, 1) w x 14x14 -> ConvT(4, 2, 1) C x 28x28, tanh
    D: x -> Conv(4, 2, 1) w/2 x 14x14                 }  joined: w x 14x14
       y one-hot planes (28x28) -> Conv(4, 2, 1) w/2  }
       -> Conv(4, 2, 1) 2w x 7x7 -> Conv(3, 2, 1) 4w x 4x4 -> Conv(4, 1, 0) one score

LeakyReLU(0.2) after every layer but the last. w = --g-width / --d-width (128 in the
record).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gankit.errors import ConfigError
from gankit.models.blocks import Discriminator, Generator, check_labels, one_hot

IMAGE_SIZE = (28, 28)


def _check(cfg, image_shape, num_classes: int, who: str) -> None:
    if tuple(image_shape[1:]) != IMAGE_SIZE:
        raise ConfigError(f"the cdcgan {who} is built for 28x28 images, got "
                          f"{image_shape[1]}x{image_shape[2]}; use --image-size 28 or dcgan")
    if not cfg.conditional or num_classes < 2:
        raise ConfigError(f"the cdcgan {who} is class-conditional: add --conditional and use "
                          "labelled data")


class CDCGANGenerator(Generator):
    def __init__(self, cfg, latent_dim: int, image_shape, num_classes: int):
        _check(cfg, image_shape, num_classes, "generator")
        super().__init__(cfg, latent_dim, image_shape, num_classes)
        self.label_embedding = None  # labels enter as one-hot maps, not an embedding
        w, channels = cfg.g_width, self.image_shape[0]
        self.from_z = nn.ConvTranspose2d(latent_dim, 2 * w, 4, 1, 0)
        self.from_y = nn.ConvTranspose2d(self.num_classes, 2 * w, 4, 1, 0)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y=None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects z of shape (N, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        y = check_labels(y, z.shape[0], self.num_classes, "generator")
        h = torch.cat([F.leaky_relu(self.from_z(z[:, :, None, None]), 0.2),
                       F.leaky_relu(self.from_y(one_hot(y, self.num_classes, z)[:, :, None, None]), 0.2)],
                      dim=1)
        return self.body(h).contiguous()  # as Generator.forward: the usual layout out


class CDCGANDiscriminator(Discriminator):
    def __init__(self, cfg, image_shape, num_classes: int):
        _check(cfg, image_shape, num_classes, "discriminator")
        if cfg.d_width < 2 or cfg.d_width % 2:
            raise ConfigError(f"the cdcgan discriminator splits --d-width between image and "
                              f"label branches: it must be even, got {cfg.d_width}")
        super().__init__(cfg, image_shape, num_classes)
        w, channels = cfg.d_width, self.image_shape[0]
        self.from_x = nn.Conv2d(channels, w // 2, 4, 2, 1)
        self.from_y = nn.Conv2d(self.num_classes, w // 2, 4, 2, 1)
        self.body = nn.Sequential(
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 4, 1, 0), nn.Flatten(0),
        )

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:
        x, y = self.checked_input(x, y)
        planes = one_hot(y, self.num_classes, x)[:, :, None, None].expand(-1, -1, *IMAGE_SIZE)
        h = torch.cat([F.leaky_relu(self.from_x(x), 0.2), F.leaky_relu(self.from_y(planes), 0.2)],
                      dim=1)
        return self.body(h)
