"""Tests of toolkit.models: shapes, ranges, training steps, depth rules, spectral norm,
per-sample independence, train/eval behaviour, label conditioning, Opacus compatibility."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gankit.config import ModelConfig
from gankit.errors import ConfigError
from gankit.models import (DISCRIMINATORS, GENERATORS, GaussianNoise, build_discriminator,
                            build_generator)
from gankit.models.blocks import Maxout, group_count
from gankit.models.dcgan import auto_depth

# The record's cdcgan is conditional, 28x28 and norm-free only: tests/test_cdcgan.py.
G_ARCHS = sorted(a for a in GENERATORS if a != "cdcgan")
D_ARCHS = sorted(a for a in DISCRIMINATORS if a != "cdcgan")

LATENT = 16
MNIST = (1, 28, 28)
CLASSES = 10
BATCH = 4
D_NORMS = ("none", "group", "layer", "instance", "batch")
# (conditional, conditioning)
CONDITIONS = [(False, "projection"), (True, "concat"), (True, "projection")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: extra intra-op threads only add overhead, and when the machine is
    busy their spin-waiting made this file ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(**kw) -> ModelConfig:
    kw.setdefault("g_width", 8)
    kw.setdefault("d_width", 8)
    return ModelConfig(**kw)


def build(cfg: ModelConfig, shape=MNIST):
    torch.manual_seed(0)
    n = CLASSES if cfg.conditional else 0
    return build_generator(cfg, LATENT, shape, n), build_discriminator(cfg, shape, n)


def labels(n=BATCH, seed=1):
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def images(n=BATCH, shape=MNIST, seed=2):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def snapshot(model: nn.Module) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def unchanged(model: nn.Module, before: dict) -> list:
    return [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]


def norm_supported(d_arch: str, d_norm: str) -> bool:
    # Fully connected discriminators have no spatial positions for instance norm.
    return not (d_arch in ("mlp", "maxout") and d_norm == "instance")


# --------------------------------------------------------------------------- the full matrix

@pytest.mark.parametrize("d_norm", D_NORMS)
@pytest.mark.parametrize("conditional,conditioning", CONDITIONS, ids=["uncond", "concat", "proj"])
@pytest.mark.parametrize("d_arch", D_ARCHS)
@pytest.mark.parametrize("g_arch", G_ARCHS)
def test_shapes_ranges_and_one_training_step(g_arch, d_arch, conditional, conditioning, d_norm):
    cfg = make_cfg(g_arch=g_arch, d_arch=d_arch, conditional=conditional,
                   conditioning=conditioning, d_norm=d_norm)
    if not norm_supported(d_arch, d_norm):
        with pytest.raises(ConfigError, match="instance"):
            build(cfg)
        return
    G, D = build(cfg)
    y = labels() if conditional else None
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(3))
    real = images()

    fake = G(z, y)
    assert fake.shape == (BATCH, *MNIST)
    assert fake.min() >= -1 and fake.max() <= 1
    assert fake.std() > 0  # not a constant image
    scores = D(real, y)
    assert scores.shape == (BATCH,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()

    def d_loss():
        return (F.binary_cross_entropy_with_logits(D(real, y), torch.ones(BATCH))
                + F.binary_cross_entropy_with_logits(D(fake.detach(), y), torch.zeros(BATCH)))

    # Discriminator step: every parameter moves, and the loss on the same batch goes down
    # (Adam's first step is a small step against the sign of the gradient; 1e-4 keeps it
    # small enough for the curvature of batch norm over 4 samples).
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-4)
    before, loss = snapshot(D), d_loss()
    assert torch.isfinite(loss)
    d_opt.zero_grad()
    loss.backward()
    d_opt.step()
    assert unchanged(D, before) == []
    with torch.no_grad():
        assert d_loss() < loss

    # Generator step with the non-saturating loss.
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-3)
    before = snapshot(G)
    g_loss = F.binary_cross_entropy_with_logits(D(G(z, y), y), torch.ones(BATCH))
    assert torch.isfinite(g_loss)
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
    assert unchanged(G, before) == []


@pytest.mark.parametrize("g_norm", ["batch", "none"])
@pytest.mark.parametrize("g_arch", G_ARCHS)
def test_generator_norms(g_arch, g_norm):
    G, _ = build(make_cfg(g_arch=g_arch, g_norm=g_norm))
    has_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in G.modules())
    assert has_bn == (g_norm == "batch")
    out = G(torch.randn(BATCH, LATENT))
    assert out.shape == (BATCH, *MNIST) and out.abs().max() <= 1


# --------------------------------------------------------------------------- dcgan shapes and depth

@pytest.mark.parametrize("shape,depth", [((1, 28, 28), 2), ((3, 32, 32), 3), ((1, 64, 64), 4)])
@pytest.mark.parametrize("conditional", [False, True])
def test_dcgan_image_shapes(shape, depth, conditional):
    cfg = make_cfg(conditional=conditional, conditioning="concat", d_norm="group")
    G, D = build(cfg, shape)
    assert G.depth == depth and D.depth == depth
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in G.modules()) == depth
    assert sum(isinstance(m, nn.Conv2d) for m in D.modules()) == depth
    y = labels() if conditional else None
    fake = G(torch.randn(BATCH, LATENT), y)
    assert fake.shape == (BATCH, *shape) and fake.abs().max() <= 1
    assert D(fake, y).shape == (BATCH,)


def test_dcgan_channel_widths():
    G, D = build(make_cfg(g_width=8, d_width=8), (3, 32, 32))
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in g_convs] == [(32, 16), (16, 8), (8, 8)]
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in d_convs] == [(3, 8), (8, 16), (16, 32)]
    assert D.head.linear.in_features == 32 * 4 * 4


def test_auto_depth_values():
    assert auto_depth(28, 28) == 2
    assert auto_depth(32, 32) == 3
    assert auto_depth(64, 64) == 4
    assert auto_depth(28, 32) == 2  # the tighter side decides
    assert auto_depth(7, 7) == 0


def test_explicit_depth_that_fits():
    G, D = build(make_cfg(g_depth=1, d_depth=4), (1, 32, 32))
    assert G.depth == 1 and D.depth == 4  # 4 stages on 32 -> 2x2 is allowed explicitly
    assert G(torch.randn(2, LATENT)).shape == (2, 1, 32, 32)
    assert D(images(2, (1, 32, 32))).shape == (2,)


@pytest.mark.parametrize("field,value,shape", [
    ("g_depth", 3, (1, 28, 28)),   # 28 / 8 is not whole
    ("d_depth", 3, (1, 28, 28)),
    ("d_depth", 5, (3, 32, 32)),   # 1x1 map
    ("g_depth", -1, (1, 28, 28)),
])
def test_impossible_explicit_depth_raises(field, value, shape):
    with pytest.raises(ConfigError, match="depth"):
        build(make_cfg(**{field: value}), shape)


def test_image_too_small_for_dcgan_raises():
    with pytest.raises(ConfigError, match="cannot fit"):
        build(make_cfg(), (1, 7, 7))


def test_mlp_and_maxout_sizes():
    cfg = make_cfg(g_arch="mlp", d_arch="maxout", g_width=8, d_width=8, maxout_pieces=3)
    G, D = build(cfg)
    g_linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in g_linears] == [32, 32, 28 * 28]  # depth 2, 4 * width
    maxouts = [m for m in D.modules() if isinstance(m, Maxout)]
    assert [(m.units, m.pieces, m.linear.out_features) for m in maxouts] == [(32, 3, 96)] * 2
    _, D = build(make_cfg(d_arch="mlp", d_depth=3))
    assert sum(isinstance(m, nn.Linear) for m in D.body.modules()) == 3


def test_maxout_layer_is_max_over_pieces():
    layer = Maxout(3, units=2, pieces=4)
    x = torch.randn(5, 3)
    pieces = layer.linear(x).view(5, 2, 4)
    assert torch.equal(layer(x), pieces.max(dim=2).values)


def test_group_count_divides_channels():
    for c in (1, 2, 3, 8, 12, 16, 24, 64, 100, 256):
        g = group_count(c)
        assert c % g == 0 and 1 <= g <= 8
    assert group_count(64) == 8 and group_count(8) == 4 and group_count(3) == 1


def test_unknown_names_raise_config_error():
    with pytest.raises(ConfigError, match="generator"):
        build_generator(make_cfg(g_arch="resnet"), LATENT, MNIST, 0)
    with pytest.raises(ConfigError, match="discriminator"):
        build_discriminator(make_cfg(d_arch="resnet"), MNIST, 0)
    with pytest.raises(ConfigError, match="normalization"):
        build_discriminator(make_cfg(d_norm="weird"), MNIST, 0)
    with pytest.raises(ConfigError, match="normalization"):
        build_generator(make_cfg(g_norm="group"), LATENT, MNIST, 0)


# --------------------------------------------------------------------------- spectral norm

@pytest.mark.parametrize("d_arch", D_ARCHS)
def test_spectral_norm_bounds_every_weight(d_arch):
    cfg = make_cfg(d_arch=d_arch, spectral_norm=True, conditional=True, conditioning="projection")
    _, D = build(cfg)
    layers = [m for m in D.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    D.train()
    with torch.no_grad():
        for _ in range(10):  # one power iteration per training forward
            D(images(), labels())
    D.eval()
    for m in layers:
        w = m.weight.detach()  # the normalized weight that forward uses
        sigma = torch.linalg.matrix_norm(w.flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05), m
        # ... and it is the raw weight divided by its own largest singular value.
        raw = m.parametrizations.weight.original.detach().flatten(1)
        raw_sigma = torch.linalg.matrix_norm(raw, ord=2)
        assert torch.allclose(w.flatten(1) * raw_sigma, raw, rtol=0.05, atol=1e-7)


def test_no_spectral_norm_by_default():
    _, D = build(make_cfg())
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in D.modules())


# ----------------------------------------------------------------------- per-sample independence

def first_score_with_other_samples_changed(D, y):
    x = images(seed=5)
    other = x.clone()
    other[1:] = images(seed=6)[1:] * 0.5 + 0.3  # different rest-of-batch, same sample 0
    with torch.no_grad():
        return D(x, y)[0], D(other, y)[0]


SUPPORTED_D_NORMS = [(a, n) for a in D_ARCHS for n in D_NORMS
                     if norm_supported(a, n)]


@pytest.mark.parametrize("conditional,conditioning", CONDITIONS, ids=["uncond", "concat", "proj"])
@pytest.mark.parametrize("d_arch,d_norm", SUPPORTED_D_NORMS)
def test_per_sample_independence(d_arch, d_norm, conditional, conditioning):
    cfg = make_cfg(d_arch=d_arch, d_norm=d_norm, conditional=conditional,
                   conditioning=conditioning)
    _, D = build(cfg)
    D.train()
    a, b = first_score_with_other_samples_changed(D, labels() if conditional else None)
    if d_norm == "batch":
        assert not torch.allclose(a, b, atol=1e-5)  # batch statistics mix samples
    else:
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- train vs eval

@pytest.mark.parametrize("dropout,noise", [(0.5, 0.0), (0.0, 0.3)], ids=["dropout", "noise"])
@pytest.mark.parametrize("d_arch", D_ARCHS)
def test_dropout_and_noise_only_in_train_mode(d_arch, dropout, noise):
    _, D = build(make_cfg(d_arch=d_arch, d_dropout=dropout, instance_noise=noise))
    x = images()
    D.train()
    assert not torch.equal(D(x), D(x))
    D.eval()
    assert torch.equal(D(x), D(x))


@pytest.mark.parametrize("d_arch", D_ARCHS)
def test_instance_noise_is_annealable(d_arch):
    _, D = build(make_cfg(d_arch=d_arch))
    assert D.noise is None  # no noise unless asked for
    _, D = build(make_cfg(d_arch=d_arch, instance_noise=0.3))
    assert isinstance(D.noise, GaussianNoise) and D.noise.std == 0.3
    x = images()
    D.train()
    assert not torch.equal(D(x), D(x))
    D.noise.std = 0.0  # what the trainer does at the end of annealing
    assert torch.equal(D(x), D(x))


def test_gaussian_noise_statistics():
    torch.manual_seed(0)
    noise = GaussianNoise(0.5)
    x = torch.zeros(200_000)
    out = noise(x)
    assert out.std().item() == pytest.approx(0.5, rel=0.02)
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.equal(x, torch.zeros(200_000))  # input left untouched
    noise.eval()
    assert noise(x) is x


# --------------------------------------------------------------------------- conditioning

@pytest.mark.parametrize("conditioning", ["concat", "projection"])
@pytest.mark.parametrize("d_arch", D_ARCHS)
def test_conditional_discriminator_depends_on_label(d_arch, conditioning):
    _, D = build(make_cfg(d_arch=d_arch, conditional=True, conditioning=conditioning))
    D.eval()
    x = images()
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        a, b = D(x, y), D(x, (y + 5) % CLASSES)
    assert (a - b).abs().min() > 1e-6  # every sample's score moves with its label
    with pytest.raises(ValueError, match="labels"):
        D(x)


@pytest.mark.parametrize("g_arch", G_ARCHS)
def test_conditional_generator_needs_and_uses_labels(g_arch):
    G, _ = build(make_cfg(g_arch=g_arch, conditional=True))
    G.eval()
    z = torch.randn(BATCH, LATENT)
    with pytest.raises(ValueError, match="labels"):
        G(z)
    with pytest.raises(ValueError, match="shape"):
        G(z, torch.zeros(BATCH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        G(z, torch.zeros(BATCH))
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert not torch.allclose(G(z, y), G(z, (y + 5) % CLASSES))


def test_unconditional_models_ignore_labels():
    G, D = build(make_cfg())
    G.eval(), D.eval()
    z, x, y = torch.randn(BATCH, LATENT), images(), labels()
    with torch.no_grad():
        assert torch.equal(G(z), G(z, y))
        assert torch.equal(D(x), D(x, y))


def test_conditional_without_classes_raises():
    cfg = make_cfg(conditional=True)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_generator(cfg, LATENT, MNIST, 0)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_discriminator(cfg, MNIST, 1)


def test_concat_conditioning_adds_label_inputs():
    _, D = build(make_cfg(conditional=True, conditioning="concat"))
    assert next(m for m in D.modules() if isinstance(m, nn.Conv2d)).in_channels == 1 + CLASSES
    _, D = build(make_cfg(d_arch="mlp", conditional=True, conditioning="concat"))
    assert next(m for m in D.modules() if isinstance(m, nn.Linear)).in_features == 784 + CLASSES


def test_projection_term_is_label_embedding_dot_features():
    _, D = build(make_cfg(d_arch="mlp", conditional=True, conditioning="projection"))
    D.eval()
    x, y = images(), labels()
    with torch.no_grad():
        h = D.body(x)
        expected = D.head.linear(h).squeeze(1) + (D.head.projection.weight.T[y] * h).sum(1)
        assert torch.allclose(D(x, y), expected, atol=1e-6)


@pytest.mark.parametrize("d_arch,d_norm", [("dcgan", "instance"), ("mlp", "layer"),
                                           ("maxout", "group")])
def test_discriminator_supports_gradient_penalty(d_arch, d_norm):
    """wgan-gp differentiates through grad_x D(x): every weight must get a gradient."""
    cfg = make_cfg(d_arch=d_arch, d_norm=d_norm, spectral_norm=True, conditional=True)
    _, D = build(cfg)
    x = images().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(D(x, labels()).sum(), x, create_graph=True)
    penalty = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    assert torch.isfinite(penalty)
    weights = [p for name, p in D.named_parameters() if not name.endswith("bias")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


# --------------------------------------------------------------------------- per-sample gradients

@pytest.mark.parametrize("d_arch,d_norm,conditioning", [
    ("dcgan", "group", "projection"), ("dcgan", "instance", "concat"),
    ("mlp", "layer", "concat"), ("maxout", "none", "projection"),
])
def test_opacus_per_sample_gradients_match(d_arch, d_norm, conditioning):
    opacus = pytest.importorskip("opacus")
    cfg = make_cfg(d_arch=d_arch, d_norm=d_norm, conditional=True, conditioning=conditioning)
    _, D = build(cfg)
    reference = copy.deepcopy(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert opacus.validators.ModuleValidator.validate(D, strict=False) == []
        wrapped = opacus.GradSampleModule(D, loss_reduction="sum")
        x, y = images(3), labels(3)
        wrapped(x, y).sum().backward()  # warns that the images need no gradient: expected
    for (name, p), q in zip(D.named_parameters(), reference.parameters()):
        per_sample = torch.stack([torch.autograd.grad(reference(x[i:i + 1], y[i:i + 1]).sum(), q)[0]
                                  for i in range(3)])
        assert torch.allclose(p.grad_sample, per_sample, atol=1e-5), name


def test_models_have_only_opacus_leaf_parameters():
    """Every parameter lives in a standard layer, never directly on one of our modules."""
    standard = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.GroupNorm,
                nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm2d)
    for g, d in itertools.product(GENERATORS, DISCRIMINATORS):
        G, D = build(make_cfg(g_arch=g, d_arch=d, conditional=True, d_norm="group"))
        for model in (G, D):
            for m in model.modules():
                if any(True for _ in m.parameters(recurse=False)):
                    assert isinstance(m, standard), type(m)


@pytest.mark.parametrize("arch", ["dcgan", "cdcgan"])
def test_generator_is_built_channels_last_and_returns_the_usual_layout(arch):
    """The layout is a speed choice only: the same weights in the default layout give the
    same images, and the images come out contiguous (the private D's per-sample gradients
    need that) for colour images too."""
    from gankit.config import Config
    from gankit.models import build_generator

    config = Config().updated({"g_arch": arch, "conditional": True, "g_width": 8})
    shape = (3, 32, 32) if arch == "dcgan" else (1, 28, 28)
    torch.manual_seed(0)
    G = build_generator(config.model, config.latent.latent_dim, shape, 10).eval()
    convs = [m for m in G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    plain = copy.deepcopy(G).to(memory_format=torch.contiguous_format)
    z, y = torch.randn(6, config.latent.latent_dim), torch.randint(10, (6,))
    with torch.no_grad():
        images = G(z, y)
        assert images.is_contiguous() and images.shape == (6, *shape)
        assert torch.allclose(images, plain(z, y), atol=1e-5)
