"""The record's class-conditional DCGAN (Bie et al. 2023): its shapes and size, labels as
one-hot maps, no normalization, and a D that Opacus accepts."""

import pytest
import torch

from gankit.config import Config, validate
from gankit.errors import ConfigError
from gankit.models import build_discriminator, build_generator
from gankit.presets import preset


def record_model(width=128):
    return Config().updated({**preset("dp-record"), "g_width": width, "d_width": width}).model


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_record_networks_have_the_papers_layers_and_size():
    m = record_model(128)
    G, D = build_generator(m, 128, (1, 28, 28), 10), build_discriminator(m, (1, 28, 28), 10)
    w = 128  # every layer's (weights + bias), as listed in toolkit/models/cdcgan.py
    g_expected = ((128 * 2 * w * 16 + 2 * w) + (10 * 2 * w * 16 + 2 * w)
                  + (4 * w * 2 * w * 9 + 2 * w) + (2 * w * w * 16 + w) + (w * 1 * 16 + 1))
    d_expected = ((1 * w // 2 * 16 + w // 2) + (10 * w // 2 * 16 + w // 2)
                  + (w * 2 * w * 16 + 2 * w) + (2 * w * 4 * w * 9 + 4 * w) + (4 * w * 16 + 1))
    assert count(G) == g_expected and count(D) == d_expected
    norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.InstanceNorm2d, torch.nn.LayerNorm)
    assert not any(isinstance(x, norms) for x in list(G.modules()) + list(D.modules()))


def test_shapes_range_and_labels_matter():
    m = record_model(16)
    G, D = build_generator(m, 128, (1, 28, 28), 10), build_discriminator(m, (1, 28, 28), 10)
    z = torch.randn(6, 128)
    y = torch.arange(6)
    x = G(z, y)
    assert x.shape == (6, 1, 28, 28) and x.abs().max() <= 1
    assert D(x, y).shape == (6,)
    assert not torch.allclose(G(z, y), G(z, (y + 1) % 10))  # the label branch reaches the image
    assert not torch.allclose(D(x, y), D(x, (y + 1) % 10))
    with pytest.raises(ValueError, match="conditional"):
        D(x)


def test_discriminator_passes_opacus_validation():
    pytest.importorskip("opacus")
    from gankit.privacy import module_problems

    assert module_problems(build_discriminator(record_model(16), (1, 28, 28), 10)) == []


@pytest.mark.parametrize("overrides,message", [
    ({"d_norm": "group"}, "--d-norm none"),
    ({"g_norm": "batch"}, "--g-norm none"),
    ({"conditional": False}, "--conditional"),
])
def test_config_refuses_what_the_record_networks_lack(overrides, message):
    config = Config().updated({**preset("dp-record"), **overrides})
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_other_image_sizes_and_odd_widths_are_refused():
    m = record_model(16)
    with pytest.raises(ConfigError, match="28x28"):
        build_generator(m, 128, (1, 32, 32), 10)
    with pytest.raises(ConfigError, match="even"):
        build_discriminator(Config().updated({**preset("dp-record"), "d_width": 15}).model,
                            (1, 28, 28), 10)
