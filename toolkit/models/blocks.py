"""Pieces shared by every generator and discriminator.

- normalization factories (`d_norm`, `g_norm`),
- `Maxout` and `GaussianNoise` layers,
- `init_weights` and `apply_spectral_norm`, applied once by the `build_*` functions,
- label handling: `Generator` and `Discriminator` base classes own everything about labels,
  instance noise and the output head, so each architecture only builds its body.

Discriminators must stay usable with per-sample gradients (Opacus): no in-place ops, every
parameter lives in a standard leaf layer (Linear, Conv2d, norms), and apart from "batch" no
normalization mixes samples.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gankit.errors import ConfigError

D_NORM_CHOICES = ("none", "group", "layer", "instance", "batch")
G_NORM_CHOICES = ("batch", "none")


# --------------------------------------------------------------------------- normalization

def group_count(channels: int, max_groups: int = 8) -> int:
    """Groups for GroupNorm: a divisor of `channels`, at most `max_groups`, and at least two
    channels per group where possible (one channel per group would just be instance norm)."""
    groups = math.gcd(channels, max_groups)
    while groups > 1 and channels // groups < 2:
        groups //= 2  # gcd with a power of two is a power of two, so halving still divides
    return groups


def norm_cancels_bias(kind: str) -> bool:
    """Whether a norm subtracts a per-channel mean, making the preceding layer's bias useless.
    Group and layer norm subtract a mean shared by several channels, so they keep it."""
    return kind in ("batch", "instance")


def d_norm(kind: str, channels: int, spatial: bool, arch: str = "dcgan") -> nn.Module:
    """Discriminator normalization after a conv (`spatial=True`) or a linear layer.

    "layer" is GroupNorm(1, C): on conv maps it normalizes over (C, H, W) per sample, which
    nn.LayerNorm cannot do without knowing H and W; on vectors it equals LayerNorm.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        if not spatial:
            raise ConfigError(
                f"d-norm 'instance' normalizes each channel over its spatial positions, and the "
                f"{arch} discriminator has none; use none, group, layer or batch")
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    raise ConfigError(f"unknown discriminator normalization '{kind}' "
                      f"(choose from {', '.join(D_NORM_CHOICES)})")


def g_norm(kind: str, channels: int, spatial: bool) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown generator normalization '{kind}' "
                      f"(choose from {', '.join(G_NORM_CHOICES)})")


# --------------------------------------------------------------------------- layers

class Maxout(nn.Module):
    """Maxout units (Goodfellow et al. 2013): `units` outputs, each the max of `pieces`
    affine functions of the input. One Linear computes all pieces; pieces of a unit are
    adjacent in its output."""

    def __init__(self, in_features: int, units: int, pieces: int):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unflatten(1, (self.units, self.pieces)).amax(dim=2)

    def extra_repr(self) -> str:
        return f"units={self.units}, pieces={self.pieces}"


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only (instance noise).

    `std` is a plain float so the trainer can anneal it by assigning `D.noise.std` each step;
    it is not a parameter or buffer, so checkpoints do not carry it.
    """

    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std  # out of place: the input stays intact
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


# --------------------------------------------------------------------------- init, spectral norm

def init_weights(model: nn.Module) -> None:
    """DCGAN initialization (Radford et al. 2016), the one place weights are initialized.

    Conv and Linear weights ~ N(0, 0.02), biases 0; norm scales ~ N(1, 0.02), shifts 0.
    The generator's label embedding ~ N(0, 1), the same scale as the z it is joined to.
    Must run before `apply_spectral_norm`, which reparametrizes the weights.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0)


SPECTRAL_NORM_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def apply_spectral_norm(model: nn.Module) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018) on every Linear and conv layer.

    This includes the projection layer of a projection discriminator (as in Miyato & Koyama,
    who normalize the label embedding too). One power iteration runs per training forward.
    """
    targets = [m for m in model.modules() if isinstance(m, SPECTRAL_NORM_LAYERS)]
    for m in targets:  # collected first: registering changes the module tree
        # ConvTranspose2d stores weights as (in, out, k, k); its output dim is 1.
        dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0
        nn.utils.parametrizations.spectral_norm(m, dim=dim)
    return model


# --------------------------------------------------------------------------- labels

def label_classes(cfg, num_classes: int) -> int:
    """Number of classes a model conditions on: 0 when unconditional.

    Refuses a conditional model without labelled data, and an unknown conditioning.
    """
    if not cfg.conditional:
        return 0
    if num_classes < 2:
        raise ConfigError("a conditional model needs labelled data with at least 2 classes, "
                          f"got num_classes={num_classes}")
    if cfg.conditioning not in ("projection", "concat"):
        raise ConfigError(f"unknown conditioning '{cfg.conditioning}' "
                          "(choose from projection, concat)")
    return num_classes


def check_labels(y: Optional[torch.Tensor], batch: int, num_classes: int, who: str):
    """Validates y for a conditional model; returns None for an unconditional one, which
    ignores labels (so a trainer may pass them whether or not the model uses them)."""
    if not num_classes:
        return None
    if y is None:
        raise ValueError(f"this {who} is conditional: call it with class labels y "
                         f"(a LongTensor of shape ({batch},) with values in [0, {num_classes}))")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{who} labels y must be integer class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{who} labels y must have shape ({batch},), got {tuple(y.shape)}")
    return y.long()


def one_hot(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, num_classes).to(dtype=like.dtype)


class Generator(nn.Module):
    """Base of every generator: `G(z, y=None) -> images (N, C, H, W)` in [-1, 1].

    A conditional generator embeds y (nn.Embedding, cfg.label_embed_dim) and joins it to z,
    so its body sees `self.input_dim` inputs. Subclasses set `self.body`.
    """

    def __init__(self, cfg, latent_dim: int, image_shape, num_classes: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        self.num_classes = label_classes(cfg, num_classes)
        self.conditional = bool(self.num_classes)
        self.label_embedding = (nn.Embedding(self.num_classes, cfg.label_embed_dim)
                                if self.conditional else None)
        self.input_dim = latent_dim + (cfg.label_embed_dim if self.conditional else 0)
        self.body: nn.Module = nn.Identity()

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects z of shape (N, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        y = check_labels(y, z.shape[0], self.num_classes, "generator")
        if y is not None:
            z = torch.cat([z, self.label_embedding(y)], dim=1)
        # The usual contiguous layout out, whatever the body's (build_generator makes it
        # channels-last): Opacus' per-sample conv gradients are wrong for channels-last
        # inputs (about 2% off for a channels-last D), and fakes go through the private D.
        return self.body(z).contiguous()


class OutputHead(nn.Module):
    """Features phi(x) (N, F) -> one raw score per sample (N,).

    With labels this is the projection discriminator (Miyato & Koyama 2018):
    score = linear(phi(x)) + <embed(y), phi(x)>. The embedding is a bias-free Linear applied
    to one-hot labels: the same function as nn.Embedding, but it gets the same
    initialization and spectral norm as every other Linear with no special case.
    """

    def __init__(self, features: int, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(features, 1)
        self.projection = nn.Linear(num_classes, features, bias=False) if num_classes else None
        self.classes: Optional[nn.Linear] = None  # the auxiliary classifier, when added

    def forward(self, h: torch.Tensor, y: Optional[torch.Tensor] = None, classes: bool = False):
        score = self.linear(h).squeeze(1)
        if self.projection is not None:
            score = score + (self.projection(one_hot(y, self.num_classes, h)) * h).sum(dim=1)
        return (score, self.classes(h)) if classes else score


class Discriminator(nn.Module):
    """Base of every discriminator: `D(x, y=None) -> raw scores (N,)`.

    Order in forward: instance noise on the image, then (conditioning "concat") the one-hot
    label joined to the input, then the subclass's body to features (N, F), then the head
    (with the projection term for conditioning "projection").

    Subclasses set `label_input` ("planes": one constant map per class joined as extra
    channels; "vector": the image flattened with the one-hot vector appended), build
    `self.body` taking `self.in_channels` (planes) or `self.in_features` (vector) inputs,
    and call `self._set_head(features)`.
    """

    label_input = "planes"

    def __init__(self, cfg, image_shape, num_classes: int):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.num_classes = label_classes(cfg, num_classes)
        self.conditional = bool(self.num_classes)
        self.conditioning = cfg.conditioning if self.conditional else None
        concat = self.num_classes if self.conditioning == "concat" else 0
        c, h, w = self.image_shape
        self.in_channels = c + concat
        self.in_features = c * h * w + concat
        # The trainer anneals `noise.std`; None when the run uses no instance noise.
        self.noise = GaussianNoise(cfg.instance_noise) if cfg.instance_noise > 0 else None
        self.body: nn.Module = nn.Identity()
        self.head: Optional[OutputHead] = None

    def _set_head(self, features: int) -> None:
        projection = self.conditioning == "projection"
        self.head = OutputHead(features, self.num_classes if projection else 0)

    def add_class_head(self) -> None:
        """An auxiliary classifier on D's features (Odena et al. 2017, AC-GAN): class logits
        (N, K) beside the score, returned by `D(x, y, classes=True)`."""
        if self.head is None or not self.num_classes:
            raise ConfigError(f"{type(self).__name__} has no class head: the auxiliary classifier "
                              "needs a conditional dcgan, mlp or maxout discriminator")
        self.head.classes = nn.Linear(self.head.linear.in_features, self.num_classes)

    def checked_input(self, x: torch.Tensor, y: Optional[torch.Tensor]):
        """(x with instance noise, y as class indices or None), or a ValueError saying what
        is wrong with them."""
        if tuple(x.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"discriminator expects images of shape (N, {expected}), "
                             f"got {tuple(x.shape)}")
        y = check_labels(y, x.shape[0], self.num_classes, "discriminator")
        return (self.noise(x) if self.noise is not None else x), y

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, classes: bool = False):
        """Scores (N,), or (scores, class logits (N, K)) with `classes` (see add_class_head)."""
        x, y = self.checked_input(x, y)
        if self.conditioning == "concat":
            labels = one_hot(y, self.num_classes, x)
            if self.label_input == "planes":
                planes = labels[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
                x = torch.cat([x, planes], dim=1)
            else:
                x = torch.cat([x.flatten(1), labels], dim=1)
        return self.head(self.body(x), y, classes)
