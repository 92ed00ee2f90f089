"""Per-example gradient clipping from what backpropagation has anyway ("book-keeping").

DP-SGD needs each example's gradient norm and the sum of the clipped gradients. Opacus'
hooks mode builds every example's full gradient (a batch x parameters tensor, for the whole
model at once) and then reduces it. For a layer y = W a, example i's gradient is G_i^T A_i
(its grad-outputs times its inputs, over positions), so both quantities come from the
layers' inputs and output gradients (Bu et al. 2023, "Differentially private optimization
on large model at small cost"):

- the norm: ||G_i^T A_i||^2 either directly, or as the "ghost norm"
  sum_pq (A_i A_i^T)_pq (G_i G_i^T)_pq, cheaper when a layer has few output positions and
  wide inputs (Li et al. 2022; the cheaper one is chosen per layer). Directly, a Linear
  layer uses dot products of rows; a Conv2d layer builds a few examples' gradients at a
  time with torch's grouped conv weight-gradient kernel (one group per example), 2-3x
  faster on CPU than unfolding patches for a batched product (benchmarks/clipping_layers.py);
- the clipped sum: sum_i c_i G_i^T A_i = (c G)^T A, one weight-gradient product of the
  ordinary size (torch's own kernel), or, where a conv layer's examples' gradients were
  built for the norms and fit KEPT_GRADIENT_FLOATS, a product of c with them.

D's weights never get autograd gradients: during the D step they do not require grad, and
the backward pass only carries gradients to layer inputs. Pairing: several forward passes
in one step (the real batch, then the fakes) with the same number of rows count row i of
every pass as one example, so the clipped unit is the pair (real i, fake i), as in the
Opacus modes (toolkit/privacy.py).

Supported layers: Linear, Conv2d and GroupNorm; `unsupported_layers` names any other layer
that owns parameters, and the dp mode refuses `bk` for such a D (use an Opacus mode).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)
CONV_CHUNK = 32  # examples whose conv patches are built at once for the ghost norm
# Floats of per-example conv gradients built at once (2 MB), within 32-256 examples: the
# fastest chunks measured for the recipe's and the record's conv layers
# (benchmarks/clipping_layers.py: 256 examples of a 256-weight layer, 64 of 8,192, 32 of 32,768).
GRADIENT_CHUNK_FLOATS = 1 << 19
GRADIENT_CHUNK_EXAMPLES = (32, 256)
# Per-example conv gradients of one layer kept for its clipped sum, at most (64 MB).
KEPT_GRADIENT_FLOATS = 1 << 24


def gradient_chunk(layer: nn.Module) -> int:
    low, high = GRADIENT_CHUNK_EXAMPLES
    return min(high, max(low, GRADIENT_CHUNK_FLOATS // layer.weight.numel()))


def unsupported_layers(module: nn.Module) -> list[str]:
    return [f"{name or 'the module'} ({type(m).__name__})" for name, m in module.named_modules()
            if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, SUPPORTED)]


class _Record:
    """What one layer saw in one private forward pass: its input and, after backward, its
    output's gradient."""

    __slots__ = ("input", "grad")

    def __init__(self, x: Tensor):
        self.input, self.grad = x, None


class BookKeepingClipper:
    def __init__(self, module: nn.Module, max_grad_norm: float):
        problems = unsupported_layers(module)
        if problems:
            raise ValueError("book-keeping clipping supports Linear, Conv2d and GroupNorm; "
                             f"found {', '.join(problems)}")
        self.module, self.max_grad_norm = module, max_grad_norm
        self.layers = [m for m in module.modules() if isinstance(m, SUPPORTED)
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)]
        self.records: dict = {m: [] for m in self.layers}
        self.active = False
        self.in_public_pass = False
        for m in self.layers:
            m.register_forward_hook(self._forward_hook)
        for p in self.params:
            p.requires_grad_(False)  # gradients reach layer inputs only; weights are ours
        self.summed: Optional[list[Tensor]] = None   # clipped sum of the private passes
        self.public: Optional[list[Tensor]] = None   # exact gradient of the public passes
        self.public_rows = 0  # rows of the public passes in `public`
        self._pass_rows = 0   # rows of the public passes of the current chunk

    # --- capture ---------------------------------------------------------------------------
    def _forward_hook(self, layer, inputs, output):
        if not self.active:
            return None
        if self.in_public_pass:
            # Autograd computes this pass's weight gradients itself (see public_pass).
            if layer is self.layers[0]:
                self._pass_rows += len(inputs[0])
            return None
        if layer.weight.requires_grad:
            # Autograd would add this private pass's unclipped gradient to the weights.
            raise RuntimeError("a private pass through D after a public one in the same step")
        record = _Record(inputs[0].detach())
        self.records[layer].append(record)
        if not output.requires_grad:  # the first layers: neither input nor weights need grad
            output = output.detach().requires_grad_(True)

        def keep(grad):
            record.grad = grad.detach()
        output.register_hook(keep)
        return output

    @contextmanager
    def public_pass(self):
        """Forward passes in here read no private data (G's fakes): their gradient is added
        exactly, outside the clipping and noise. It is a function of D and G alone, which
        are already post-processing of the private steps, so it costs no privacy."""
        self.in_public_pass = True
        # Autograd adds this pass's exact gradient to p.grad. The weights must keep requiring
        # grad until the backward pass has run (autograd skips weights that no longer do),
        # so clip_and_accumulate switches them off again.
        for p in self.params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            self.in_public_pass = False

    # --- clipping --------------------------------------------------------------------------
    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient of the last backward pass to max_grad_norm and add
        the clipped sum to `summed`. The recorded gradients are those of a mean over the
        rows of a pass; each example's gradient is `rows` times them (Opacus'
        loss_reduction="mean" undoes the mean the same way), a factor that is folded into
        the norms and the clipping weights rather than multiplied into every tensor."""
        pieces = {m: self._pieces(m) for m in self.layers}
        pieces = {m: p for m, p in pieces.items() if p is not None}
        n = next((len(p[0][0]) for p in pieces.values()), 0)
        kept: dict = {}  # layer -> the examples' gradients its norms built, for its clipped sum
        if n:
            norms = n * sum(self._norms_sq(m, parts, kept) for m, parts in pieces.items()).sqrt()
            weights = n * (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = [self._clipped_sum(m, pieces[m], weights, kept.get(m)) if m in pieces and n else
                [torch.zeros_like(p) for p in m.parameters(recurse=False)] for m in self.layers]
        flat = [t for layer_sums in sums for t in layer_sums]
        self.summed = flat if self.summed is None else [a + b for a, b in zip(self.summed, flat)]
        # The public passes' gradient is in p.grad (a mean over their rows): weighted by the
        # rows, so that physical chunks add up to the mean over all of them.
        rows = self._pass_rows
        public = [p.grad * rows if p.grad is not None and rows else torch.zeros_like(p)
                  for p in self.params]
        self.public = public if self.public is None else [a + b for a, b in zip(self.public, public)]
        self.public_rows += rows
        self._pass_rows = 0
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)
        self.clear_records()

    def _pieces(self, layer):
        """[(inputs, grads) per pass], rows = examples, or None when the layer saw nothing."""
        records = [r for r in self.records[layer] if r.grad is not None]
        if not records:
            return None
        rows = {len(r.input) for r in records}
        if len(rows) != 1:
            raise ValueError(f"the passes of one D step have different sizes {sorted(rows)}")
        return [(r.input, r.grad) for r in records]

    def _norms_sq(self, layer, parts, kept: dict) -> Tensor:
        if isinstance(layer, nn.Linear):
            if all(x.dim() == 2 for x, _ in parts):
                return _linear_norms_sq(parts, layer.bias is not None)
            a = _join([x.reshape(len(x), -1, x.shape[-1]) for x, _ in parts], dim=1)
            g = _join([y.reshape(len(y), -1, y.shape[-1]) for _, y in parts], dim=1)
            total = _product_norm_sq(a, g)
            if layer.bias is not None:
                total = total + g.sum(1).pow(2).sum(1)
            return total
        if isinstance(layer, nn.Conv2d):
            # A few examples at a time: what they build (patches or gradients) stays in cache
            # for the reduction that reads it. A whole batch's (tens of MB at batch 1024) costs
            # more to write and read back than the product itself (benchmarks/clipping_layers.py).
            # Where it builds the examples' gradients and they fit KEPT_GRADIENT_FLOATS, they
            # are kept: the clipped sum is then one product with the clipping weights instead
            # of a weight gradient per pass.
            keep = [] if len(parts[0][0]) * layer.weight.numel() <= KEPT_GRADIENT_FLOATS else None
            norms = conv_norms_sq(layer, parts, keep=keep)
            if keep:
                kept[layer] = keep
            return norms
        # GroupNorm: weight gradient sum_hw x_hat * g, bias gradient sum_hw g, per channel;
        # small enough (examples x channels) to keep for the clipped sum.
        per_channel = lambda t: t.reshape(len(t), t.shape[1], -1).sum(2)  # noqa: E731
        w = sum(per_channel(_group_norm_hat(layer, x) * y) for x, y in parts)
        b = sum(per_channel(y) for _, y in parts)
        kept[layer] = (w, b)
        return w.pow(2).sum(1) + b.pow(2).sum(1)

    def _clipped_sum(self, layer, parts, weights: Tensor, kept) -> list[Tensor]:
        """sum_i weights_i * (example i's gradient): from the examples' gradients where the
        norms kept them (`kept`), else from the layer's inputs and grads."""
        if isinstance(layer, nn.GroupNorm):
            return [weights @ t for t in kept]
        if isinstance(layer, nn.Conv2d) and kept is not None:
            # Chunk by chunk: joining the kept gradients first would copy all of them.
            starts = itertools.accumulate([len(g) for g in kept[:-1]], initial=0)
            weight = sum(weights[i:i + len(g)] @ g for i, g in zip(starts, kept)).view_as(layer.weight)
        else:
            # The gradient is bilinear in an example's input and grad: scale the smaller one.
            scale = lambda t: t * weights.view(-1, *([1] * (t.dim() - 1)))  # noqa: E731
            scaled = [(scale(x), y) if x[0].numel() < y[0].numel() else (x, scale(y)) for x, y in parts]
            if isinstance(layer, nn.Linear):
                weight = sum(y.reshape(-1, y.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x, y in scaled)
            else:
                weight = sum(torch.nn.grad.conv2d_weight(x, layer.weight.shape, y, layer.stride,
                                                         layer.padding, layer.dilation, layer.groups)
                             for x, y in scaled)
        if layer.bias is None:
            return [weight]
        per_example = (lambda y: y.reshape(len(y), -1, y.shape[-1]).sum(1)) if isinstance(layer, nn.Linear) \
            else (lambda y: y.sum((2, 3)))
        return [weight, sum(weights @ per_example(y) for _, y in parts)]

    # --- state -----------------------------------------------------------------------------
    def clear_records(self) -> None:
        for records in self.records.values():
            records.clear()
        self._pass_rows = 0

    def reset(self) -> None:
        self.clear_records()
        self.summed, self.public, self.public_rows = None, None, 0


def conv_norms_sq(layer: nn.Conv2d, parts, chunk: Optional[int] = None,
                  keep: Optional[list] = None) -> Tensor:
    """Each example's squared gradient norm for a conv layer, from [(inputs, grads) per pass],
    `chunk` examples at a time (by default what fits the method's cache budget). Where the
    examples' weight gradients are built (not the ghost norm), `keep` (a list) receives them
    chunk by chunk, as (examples, weights) tensors."""
    _check_conv(layer)
    n = len(parts[0][0])
    method, default_chunk = conv_norm_method(layer, sum(y.shape[2] * y.shape[3] for _, y in parts))
    chunk = chunk or default_chunk
    if method == "ghost":
        total = torch.cat([_conv_ghost_norms_sq(layer, [(x[i:i + chunk], y[i:i + chunk]) for x, y in parts])
                           for i in range(0, n, chunk)])
    else:
        grads = [_conv_example_grads(layer, [(x[i:i + chunk], y[i:i + chunk]) for x, y in parts])
                 for i in range(0, n, chunk)]
        total = torch.cat([torch.linalg.vector_norm(g, dim=1).pow(2) for g in grads])
        if keep is not None:
            keep.extend(grads)
    if layer.bias is not None:
        total = total + sum(y.sum((2, 3)) for _, y in parts).pow(2).sum(1)
    return total


def _conv_example_grads(layer: nn.Conv2d, parts) -> Tensor:
    """The examples' weight gradients (examples, weights), as one grouped conv weight
    gradient: the examples become groups (channels side by side), the passes the batch it
    sums over."""
    x = torch.stack([x for x, _ in parts])  # (passes, N, C_in, H, W)
    y = torch.stack([y for _, y in parts])  # (passes, N, C_out, H', W')
    passes, n = x.shape[:2]
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(passes, -1, *x.shape[3:]), (n * layer.out_channels, *layer.weight.shape[1:]),
        y.reshape(passes, -1, *y.shape[3:]), layer.stride, layer.padding, layer.dilation, groups=n)
    return grads.reshape(n, -1)


def _linear_norms_sq(parts, bias: bool) -> Tensor:
    """A Linear layer fed (N, D) rows in every pass: example i's gradient is
    sum_p g_pi a_pi^T, whose squared norm is sum_pq (a_pi . a_qi)(g_pi . g_qi)."""
    total = 0
    for p, (a_p, g_p) in enumerate(parts):
        for q, (a_q, g_q) in enumerate(parts[p:], start=p):
            g_dot = (g_p * g_q).sum(1)
            term = (a_p * a_q).sum(1) * g_dot + (g_dot if bias else 0)
            total = total + (term if p == q else 2 * term)
    return total


def _conv_ghost_norms_sq(layer: nn.Conv2d, parts) -> Tensor:
    a = _join([_unfold(layer, x) for x, _ in parts], dim=2).transpose(1, 2)
    g = _join([y.flatten(2) for _, y in parts], dim=2).transpose(1, 2)
    return _ghost_norm_sq(a, g)


def conv_norm_method(layer: nn.Conv2d, positions: int) -> tuple[str, int]:
    """("ghost" or "direct", examples per chunk) for a conv layer's norms, given its output
    positions over all the passes of a step."""
    if ghost_norm_is_cheaper(positions, layer.weight[0].numel(), layer.out_channels):
        return "ghost", CONV_CHUNK
    return "direct", gradient_chunk(layer)


def ghost_norm_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """The ghost norm costs T^2 (D_in + D_out) per example, the direct product T D_in D_out."""
    return positions * positions * (d_in + d_out) < positions * d_in * d_out


def _join(parts: list[Tensor], dim: int) -> Tensor:
    """The passes of a pair side by side (no copy for a single pass)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _check_conv(layer: nn.Conv2d) -> None:
    if layer.groups != 1:
        raise ValueError("book-keeping clipping supports Conv2d with groups=1 only")
    if not isinstance(layer.padding, tuple):
        raise ValueError("book-keeping clipping needs a numeric Conv2d padding")


def _unfold(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """Conv input patches (N, C_in * kh * kw, positions)."""
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)


def _product_norm_sq(a: Tensor, g: Tensor) -> Tensor:
    """||g_i^T a_i||_F^2 per example for a (N, T, D_in), g (N, T, D_out): directly, or by
    the ghost norm sum_ts (a a^T)_ts (g g^T)_ts when T^2 (D_in + D_out) is cheaper than
    T D_in D_out."""
    if ghost_norm_is_cheaper(a.shape[1], a.shape[2], g.shape[2]):
        return _ghost_norm_sq(a, g)
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))


def _ghost_norm_sq(a: Tensor, g: Tensor) -> Tensor:
    """sum_ts (a a^T)_ts (g g^T)_ts per example, for a (N, T, D_in), g (N, T, D_out)."""
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def _group_norm_hat(layer: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x, layer.num_groups, eps=layer.eps)


class BookKeepingOptimizer:
    """The private optimizer over a plain one (Opacus' DPOptimizer contract: `step` clips,
    sums, noises, divides by the expected batch size and steps the wrapped optimizer;
    `signal_skip_step` accumulates a physical chunk without stepping)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: BookKeepingClipper,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 accountant, sample_rate: float):
        self.original_optimizer, self.clipper = optimizer, clipper
        self.noise_multiplier = noise_multiplier
        clipper.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.accountant, self.sample_rate = accountant, sample_rate
        self.params = clipper.params
        self._skip = False

    @property
    def max_grad_norm(self) -> float:
        """One clipping norm for the clipper and the noise (as in Opacus' DPOptimizer)."""
        return self.clipper.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self.clipper.max_grad_norm = value

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.original_optimizer.load_state_dict(state)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self._skip = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The D step clears gradients between its forward and backward passes, so what the
        # hooks saw stays (step consumes it), and so does the clipped sum of skipped
        # chunks until the step that noises it (Opacus' contract).
        for p in self.params:
            p.grad = None

    def step(self, closure=None):
        self.clipper.clip_and_accumulate()
        if self._skip:
            self._skip = False
            return None
        summed, public = self.clipper.summed, self.clipper.public
        rows = max(self.clipper.public_rows, 1)
        std = self.noise_multiplier * self.max_grad_norm
        for p, s, exact in zip(self.params, summed, public):
            noised = s + torch.normal(0.0, std, size=s.shape, device=s.device)
            p.grad = noised / self.expected_batch_size + exact / rows
        self.clipper.reset()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.original_optimizer.step(closure)
