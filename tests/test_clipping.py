"""Book-keeping clipping's per-example conv norms against each example's own gradient."""

import copy

import pytest
import torch
from torch import nn

from gankit.clipping import BookKeepingClipper, conv_norm_method, conv_norms_sq


def per_example_norms_sq(layer, inputs, grads):
    """||d(sum over passes of <y_p, layer(x_p)>)/d(weights)||^2, one example at a time."""
    out = []
    for i in range(len(inputs[0])):
        loss = sum((layer(x[i:i + 1]) * y[i:i + 1]).sum() for x, y in zip(inputs, grads))
        g = torch.autograd.grad(loss, list(layer.parameters()))
        out.append(sum(t.pow(2).sum() for t in g))
    return torch.stack(out)


@pytest.mark.parametrize("layer,size,method", [
    (nn.Conv2d(3, 5, 4, 2, 1), 12, "direct"),               # many positions: the examples' own gradients
    (nn.Conv2d(3, 4, 3, 1, 1, bias=False), 8, "direct"),
    (nn.Conv2d(16, 32, 3, 2, 1, dilation=2), 5, "ghost"),   # few positions, wide input
])
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("chunk", [None, 3])
def test_conv_norms_equal_each_examples_gradient_norm(layer, size, method, passes, chunk):
    torch.manual_seed(0)
    n = 7  # not a multiple of the chunk
    inputs = [torch.randn(n, layer.in_channels, size, size) for _ in range(passes)]
    with torch.no_grad():
        grads = [torch.randn_like(layer(x)) for x in inputs]
    assert conv_norm_method(layer, passes * grads[0].shape[2] * grads[0].shape[3])[0] == method
    want = per_example_norms_sq(layer, inputs, grads)
    got = conv_norms_sq(layer, list(zip(inputs, grads)), chunk=chunk)
    assert got.shape == (n,)
    assert torch.allclose(got, want, rtol=1e-4)


def test_unsupported_conv_layers_are_refused():
    parts = [(torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6))]
    with pytest.raises(ValueError, match="groups=1"):
        conv_norms_sq(nn.Conv2d(4, 4, 3, 1, 1, groups=2), parts)
    with pytest.raises(ValueError, match="numeric Conv2d padding"):
        conv_norms_sq(nn.Conv2d(4, 4, 3, 1, "same"), parts)


CLIP = 1.9  # between the pairs' gradient norms (1.70-2.15): some are clipped, some not


def test_clipper_sums_each_pairs_clipped_gradient():
    """Two passes (real i with fake i) through conv layers on both norm paths, GroupNorm and
    Linear with bias: the clipped sum equals sum_i clip(g_i) computed one pair at a time."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Conv2d(2, 6, 4, 2, 1), nn.GroupNorm(2, 6), nn.LeakyReLU(0.2),
                      nn.Conv2d(6, 16, 3, 2, 1), nn.LeakyReLU(0.2),   # 7px -> 4px: direct
                      nn.Conv2d(16, 16, 3, 2, 1), nn.LeakyReLU(0.2),  # 4px -> 2px: ghost
                      nn.Flatten(), nn.Linear(16 * 4, 1))
    plain = copy.deepcopy(D)  # no hooks: the reference
    real, fake = torch.randn(5, 2, 14, 14), torch.randn(5, 2, 14, 14)
    clipper = BookKeepingClipper(D, max_grad_norm=CLIP)
    clipper.active = True
    (D(real).pow(2).mean() + D(fake).mean()).backward()  # a mean over rows, as the D loss is
    clipper.clip_and_accumulate()

    want = [torch.zeros_like(p) for p in plain.parameters()]
    clipped = 0
    for i in range(len(real)):
        pair = plain(real[i:i + 1]).pow(2).sum() + plain(fake[i:i + 1]).sum()
        grads = torch.autograd.grad(pair, list(plain.parameters()))
        factor = min(1.0, CLIP / (float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) + 1e-6))
        clipped += factor < 1
        for w, g in zip(want, grads):
            w += factor * g
    assert 0 < clipped < len(real)
    for got, w in zip(clipper.summed, want):
        assert torch.allclose(got, w, rtol=1e-4, atol=1e-6)
