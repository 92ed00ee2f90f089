"""Where the private D step's extra time goes: per layer, the per-example norms against the
layer's ordinary weight gradient.

    python benchmarks/clipping_layers.py                   # the record's D, width 32, batch 128
    python benchmarks/clipping_layers.py --model dcgan --width 16 --batch-size 1024 --conditioning projection

Book-keeping clipping (toolkit/clipping.py) computes, for every layer of one private pass,
the ordinary weight gradient of the clipped examples (which the standard step computes too)
plus each example's gradient norm, which only the private step needs. For a conv layer the
norm comes either from the examples' own gradients (one grouped conv weight gradient, an
example per group) or from the ghost norm (input patches by unfold). This prints, per layer,
the norms' time for the whole batch at once and a chunk of examples at a time (as the clipper
does), as a multiple of the ordinary weight gradient: the private step's overhead over the
standard one is mostly these norms, summed over the layers of the private pass.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from gankit.clipping import conv_norm_method, conv_norms_sq
from gankit.config import Config
from gankit.models import build_discriminator
from gankit.presets import preset


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="record", choices=["record", "dcgan"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--conditioning", default="", help="dcgan only: e.g. projection")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    options = ({**preset("dp-record"), "d_steps_schedule": "fixed"} if args.model == "record"
               else {"conditional": True, **({"conditioning": args.conditioning} if args.conditioning else {})})
    config = Config().updated({**options, "g_width": args.width, "d_width": args.width})
    D = build_discriminator(config.model, (1, 28, 28), 10)
    inputs = {}

    def keep(layer, args, out):
        inputs[layer] = (args[0].detach(), out.detach())
    for m in D.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(keep)
    n = args.batch_size
    gen = torch.Generator().manual_seed(0)
    D(torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(10, (n,), generator=gen))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} D of width "
          f"{args.width}, batch {n}; ms per layer, median of {args.repeats}")
    print(f"{'layer':34}{'positions':>10}{'norm by':>8}{'chunk':>6}{'weight grad':>13}{'norms, batch':>14}"
          f"{'chunked':>9}{'ratio to weight grad: batch':>29}{'chunked':>9}")
    totals = [0.0, 0.0, 0.0]
    for layer, (x, out) in inputs.items():
        g = torch.randn_like(out)
        weight = median_ms(lambda: torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, layer.stride,
                                                               layer.padding, layer.dilation), args.repeats)
        # The whole batch's patches at once, and what the clipper does: a chunk of examples at a time.
        whole = median_ms(lambda: conv_norms_sq(layer, [(x, g)], chunk=n), args.repeats)
        chunked = median_ms(lambda: conv_norms_sq(layer, [(x, g)]), args.repeats)
        t = out.shape[2] * out.shape[3]
        way, chunk = conv_norm_method(layer, t)
        name = f"{type(layer).__name__}({layer.in_channels}->{layer.out_channels}, {x.shape[-1]}px)"
        print(f"{name:34}{t:10d}{way:>8}{min(chunk, n):6d}{weight:13.2f}{whole:14.2f}{chunked:9.2f}"
              f"{whole / weight:29.2f}{chunked / weight:9.2f}")
        for k, v in enumerate((weight, whole, chunked)):
            totals[k] += v
    print(f"{'all conv layers':58}{totals[0]:13.2f}{totals[1]:14.2f}{totals[2]:9.2f}"
          f"{totals[1] / totals[0]:29.2f}{totals[2] / totals[0]:9.2f}")


if __name__ == "__main__":
    main()
