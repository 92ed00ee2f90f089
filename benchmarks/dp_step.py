"""DP training step vs standard training step, per Opacus grad sample mode, side by side.

    python benchmarks/dp_step.py                      # DCGAN D (GroupNorm), batch 64
    python benchmarks/dp_step.py --steps 10 --repeats 1 --modes ew,hooks

Both trainers are the toolkit's own (same config and seed, one in mode "standard", one in
mode "dp") and take the same real batches of exactly --batch-size images (Poisson sampling
is bypassed so that every step has the same size). A step is what the loop does: one D step
(the dp one: per-sample gradients, clipping, noise) and one G step. The D step alone is timed
too. Measurements are interleaved, so drift hits every configuration alike; medians are shown.

Before timing, each mode is checked: its per-sample gradients of a paired real/fake D step
must equal a one-pair-at-a-time loop, and a whole dp step must run. Only correct modes are
timed. Goal: dp / standard <= 2.0x on CPU for the default mode.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import GRAD_SAMPLE_MODES, Config  # noqa: E402
from toolkit.data import ImageData  # noqa: E402
from toolkit.models import build_discriminator  # noqa: E402
from toolkit.runs import RunDir  # noqa: E402
from toolkit.steps import generator_step  # noqa: E402
from toolkit.trainer import Trainer, unwrapped  # noqa: E402


def make_data(n: int) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1
    return ImageData(x, None, x[:64], None, "bench", "random images")


def make_trainer(out: str, data: ImageData, batch: int, mode: str,
                 grad_sample_mode: str = "hooks"):
    config = Config().updated(dict(mode=mode, grad_sample_mode=grad_sample_mode, epochs=1,
                                   batch_size=batch, out_dir=out, name=f"{mode}-{time.time_ns()}",
                                   progress=False, tensorboard=False, log_every=10 ** 9,
                                   eval_every=0, accountant="rdp"))
    return Trainer(config, data, RunDir.create(config))


def d_step(tr: Trainer, real) -> None:
    tr.d_step(tr.ctx, tr.D, tr.d_opt, real, None, False)


def full_step(tr: Trainer, real) -> None:
    d_step(tr, real)
    generator_step(tr.ctx, unwrapped(tr.D), tr.g_opt, tr.d_opt, real.shape[0])


def check_mode(out: str, data: ImageData, mode: str, pairs: int = 4) -> str:
    """'' when correct, else what went wrong."""
    try:
        tr = make_trainer(out, data, 64, "dp", mode)
        reference = build_discriminator(tr.config.model, data.image_shape, 0)
        reference.load_state_dict(unwrapped(tr.D).state_dict())
        real, fake = data.train_x[:pairs], data.train_x[pairs:2 * pairs].flip(-1)
        obj = tr.objective
        loss = obj.d_real(tr.D(real)).mean() + obj.d_fake(tr.D(fake)).mean()
        loss.backward()
        worst = 0.0
        for i in range(pairs):
            pair = (obj.d_real(reference(real[i:i + 1])).sum()
                    + obj.d_fake(reference(fake[i:i + 1])).sum())
            grads = torch.autograd.grad(pair, list(reference.parameters()))
            for p, g in zip(unwrapped(tr.D).parameters(), grads):
                worst = max(worst, float((p.grad_sample[i] - g).abs().max() / g.abs().max()))
        tr.d_opt.zero_grad(set_to_none=True)
        if worst > 1e-3:
            return f"per-sample gradients differ from the pair loop (relative error {worst:.2g})"
        full_step(tr, data.train_x[:64])
        return ""
    except Exception as err:  # a mode that cannot run is reported, not timed
        return f"{type(err).__name__}: {err}"


def timed(fn, tr, batches) -> float:
    start = time.perf_counter()
    for real in batches:
        fn(tr, real)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook advice
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DCGAN D (GroupNorm, "
          f"width 64) on 28x28x1, batch {args.batch_size}, {args.steps} steps per measurement, "
          f"median of {args.repeats}")
    data = make_data(args.steps * args.batch_size)
    batches = list(data.train_x.split(args.batch_size))[:args.steps]
    with tempfile.TemporaryDirectory() as out:
        modes = []
        for mode in args.modes.split(","):
            problem = check_mode(out, data, mode)
            print(f"  check {mode:10} {'correct' if not problem else 'NOT USED: ' + problem}")
            if not problem:
                modes.append(mode)
        trainers = {"standard": make_trainer(out, data, args.batch_size, "standard")}
        trainers.update({m: make_trainer(out, data, args.batch_size, "dp", m) for m in modes})
        for tr in trainers.values():  # warm-up: allocator, first-call kernel choice
            timed(full_step, tr, batches[:3])
        times = {(name, kind): [] for name in trainers for kind in ("step", "d")}
        for _ in range(args.repeats):
            for name, tr in trainers.items():
                times[name, "step"].append(timed(full_step, tr, batches))
                times[name, "d"].append(timed(d_step, tr, batches))
    med = {k: statistics.median(v) / args.steps for k, v in times.items()}
    print(f"\n{'':22}{'D+G step s':>12}{'ratio':>8}{'D step s':>12}{'ratio':>8}")
    for name in trainers:
        label = name if name == "standard" else f"dp, {name}"
        print(f"{label:22}{med[name, 'step']:12.4f}"
              f"{med[name, 'step'] / med['standard', 'step']:8.2f}{med[name, 'd']:12.4f}"
              f"{med[name, 'd'] / med['standard', 'd']:8.2f}")
    if modes:
        best = min(modes, key=lambda m: med[m, "step"])
        step, d = (med[best, k] / med["standard", k] for k in ("step", "d"))
        print(f"\nfastest correct mode: {best}, dp / standard {step:.2f}x for the whole step "
              f"(goal <= 2.0x), {d:.2f}x for the D step")


if __name__ == "__main__":
    main()
