"""G's forward and forward+backward in the channels-last layout gankit builds it in, against
the same weights in the default contiguous (NCHW) layout; prints times and ratios.

    python benchmarks/generator_layout.py                       # the DP recipe's G, batch 1024
    python benchmarks/generator_layout.py --width 32 --batch-size 64 --threads 2

The two are run interleaved, so load from other processes falls on both alike; the median of
the repeats is reported. Their outputs are also compared (the layout changes the order of
float sums, not the function).
"""

import argparse
import copy
import statistics
import time

import torch

from gankit.config import Config
from gankit.models import build_generator


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config().updated({"g_width": args.width, "conditional": True})
    channels_last = build_generator(config.model, config.latent.latent_dim, (1, 28, 28), 10)
    contiguous = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
    z = torch.randn(args.batch_size, config.latent.latent_dim)
    y = torch.randint(10, (args.batch_size,))
    with torch.no_grad():
        diff = (channels_last(z, y) - contiguous(z, y)).abs().max().item()

    def forward(G):
        with torch.no_grad():
            G(z, y)

    def forward_backward(G):
        G(z, y).square().mean().backward()

    times = {(kind, layout): [] for kind in ("forward", "forward+backward")
             for layout in ("contiguous", "channels_last")}
    for _ in range(args.repeats):
        for layout, G in (("contiguous", contiguous), ("channels_last", channels_last)):
            times[("forward", layout)].append(timed(lambda: forward(G), args.steps))
            times[("forward+backward", layout)].append(timed(lambda: forward_backward(G), args.steps))
    print(f"G width {args.width}, batch {args.batch_size}, {args.threads} thread(s); "
          f"largest output difference {diff:.2g}")
    for kind in ("forward", "forward+backward"):
        old = statistics.median(times[(kind, "contiguous")])
        new = statistics.median(times[(kind, "channels_last")])
        print(f"{kind:17s} contiguous {old * 1000:8.1f} ms   channels_last {new * 1000:8.1f} ms"
              f"   speed-up {old / new:.2f}x")


if __name__ == "__main__":
    main()
