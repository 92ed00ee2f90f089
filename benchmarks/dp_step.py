"""DP discriminator step vs standard step, per clipping mode, side by side.

    python benchmarks/dp_step.py                          # the record's D (cdcgan), width 32, batch 128
    python benchmarks/dp_step.py --model dcgan --width 64 --batch-size 64   # the default DCGAN D
    python benchmarks/dp_step.py --steps 10 --repeats 1 --modes bk-public,hooks
    python benchmarks/dp_step.py --model recipe --width 16 --batch-size 1024 --modes bk --steps 5

Both trainers are the toolkit's own (same config and seed, one in mode "standard", one in
mode "dp") and take the same real batches of exactly --batch-size images (Poisson sampling
is bypassed so that every step has the same size). Modes: `bk` (book-keeping clipping,
toolkit/clipping.py, fakes clipped with their real partner), `bk-public` (the same with
--fake-gradients public: D's gradient on G's fakes added exactly, outside the mechanism),
and Opacus' `hooks`, `ew`, `functorch` (paired). A step is what the loop does: one D step
and one G step; the D step alone is timed too. Measurements are interleaved, so drift hits
every configuration alike; medians are shown.

Before timing, each mode is checked with the noise off: the gradient its optimizer hands
to Adam must equal sum_i clip(g_i) / B computed one example at a time (g_i the gradient of
the pair (real i, fake i), or of real i alone plus the exact mean fake gradient for
bk-public). Only correct modes are timed. Goal: the D step at most 1.3x the standard one.
"""

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from gankit.config import Config
from gankit.presets import preset
from gankit.data import ImageData
from gankit.models import discriminator_for
from gankit.runs import RunDir
from gankit.steps import generator_step
from gankit.trainer import Trainer, unwrapped


def make_data(n: int) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(10, (n,), generator=gen)
    return ImageData(x, y, x[:64], y[:64], "bench", "random images")


def model_options(model: str, width: int) -> dict:
    if model == "record":
        return {**preset("dp-record"), "g_width": width, "d_width": width,
                "d_steps_schedule": "fixed"}
    if model == "recipe":  # experiments/configs/dp_mnist_cpu.json's AC-GAN rows
        return {"conditional": True, "conditioning": "projection", "d_norm": "group",
                "aux_classifier": 1.0, "g_width": width, "d_width": width}
    return {"g_width": width, "d_width": width}


def make_trainer(out: str, data: ImageData, batch: int, mode: str, model: dict,
                 clipping: str = "hooks", device: str = "cpu"):
    config = Config().updated(dict(
        model, mode=mode, device=device, grad_sample_mode=clipping.removesuffix("-public"),
        fake_gradients="public" if clipping.endswith("-public") else "paired", epochs=1,
        batch_size=batch, out_dir=out, name=f"{mode}-{time.time_ns()}", progress=False,
        tensorboard=False, log_every=10 ** 9, eval_every=0, accountant="rdp",
        poisson_sampling=False))
    return Trainer(config, data, RunDir.create(config))


def d_step(tr: Trainer, batch) -> None:
    real, labels = batch
    tr.d_step(tr.ctx, tr.D, tr.d_opt, real, labels if tr.num_classes else None, False)


def full_step(tr: Trainer, batch) -> None:
    d_step(tr, batch)
    generator_step(tr.ctx, unwrapped(tr.D), tr.g_opt, tr.d_opt, batch[0].shape[0])


def check_mode(out: str, data: ImageData, model: dict, clipping: str, n: int = 6) -> str:
    """'' when the mode's clipped gradient equals the one-example-at-a-time sum, else why."""
    try:
        tr = make_trainer(out, data, n, "dp", model, clipping)
        tr.d_opt.noise_multiplier, tr.d_opt.max_grad_norm = 0.0, 0.05
        reference = discriminator_for(tr.config, data.image_shape, tr.num_classes)
        aux = tr.config.objective.aux_classifier if tr.num_classes else 0.0
        reference.load_state_dict(unwrapped(tr.D).state_dict())
        grads, fakes = [], []
        inner = tr.d_opt.original_optimizer
        original = inner.step
        inner.step = lambda *a, **k: (grads.append([p.grad.clone() for p in tr.d_opt.params]),
                                      original(*a, **k))[1]
        tr.G.register_forward_hook(lambda m, a, o: fakes.append((o.detach(), a[1])))
        real, labels = data.train_x[:n], data.train_y[:n] if tr.num_classes else None
        d_step(tr, (real, data.train_y[:n]))
        fake, fake_labels = fakes[0]
        obj, params = tr.objective, list(reference.parameters())
        label = (lambda t, i: None if t is None else t[i:i + 1])
        expected = [torch.zeros_like(p) for p in params]
        public = clipping.endswith("-public")
        for i in range(n):
            if aux:  # the class loss is part of each real example's clipped loss
                v, logits = reference(real[i:i + 1], label(labels, i), classes=True)
                loss = obj.d_real(v).sum() + aux * F.cross_entropy(logits, labels[i:i + 1])
            else:
                loss = obj.d_real(reference(real[i:i + 1], label(labels, i))).sum()
            if not public:
                loss = loss + obj.d_fake(reference(fake[i:i + 1], label(fake_labels, i))).sum()
            g = torch.autograd.grad(loss, params)
            norm = float(torch.linalg.vector_norm(torch.stack([t.norm() for t in g])))
            for e, t in zip(expected, g):
                e += min(1.0, 0.05 / (norm + 1e-6)) * t / tr.d_opt.expected_batch_size
        if public:
            exact = torch.autograd.grad(obj.d_fake(reference(fake, fake_labels)).mean(), params)
            expected = [e + t for e, t in zip(expected, exact)]
        worst = max(float((got - want).abs().max() / (want.abs().max() + 1e-12))
                    for got, want in zip(grads[0], expected))
        if worst > 1e-3:
            return f"clipped gradient differs from the per-example loop (relative error {worst:.2g})"
        full_step(tr, (data.train_x[:n], data.train_y[:n]))
        return ""
    except Exception as err:  # a mode that cannot run is reported, not timed
        return f"{type(err).__name__}: {err}"


def timed(fn, tr, batches) -> float:
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for real in batches:
        fn(tr, real)
    sync()  # a GPU runs ahead of Python: count the work, not its launch
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="record", choices=["record", "recipe", "dcgan"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="bk-public,bk,hooks,ew,functorch")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the modes are checked on the CPU)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook advice
    model = model_options(args.model, args.width)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} D of width "
          f"{args.width} on 28x28x1, batch {args.batch_size}, {args.steps} steps per "
          f"measurement, median of {args.repeats}")
    data = make_data(args.steps * args.batch_size)
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in zip(data.train_x.split(args.batch_size), data.train_y.split(args.batch_size))]
    with tempfile.TemporaryDirectory() as out:
        modes = []
        for mode in args.modes.split(","):
            problem = check_mode(out, data, model, mode)
            print(f"  check {mode:10} {'correct' if not problem else 'NOT USED: ' + problem}")
            if not problem:
                modes.append(mode)
        trainers = {"standard": make_trainer(out, data, args.batch_size, "standard", model, device=args.device)}
        trainers.update({m: make_trainer(out, data, args.batch_size, "dp", model, m, args.device)
                         for m in modes})
        for tr in trainers.values():  # warm-up: allocator, first-call kernel choice
            timed(full_step, tr, batches[:3])
        times = {(name, kind): [] for name in trainers for kind in ("step", "d")}
        for _ in range(args.repeats):
            for name, tr in trainers.items():
                times[name, "step"].append(timed(full_step, tr, batches))
                times[name, "d"].append(timed(d_step, tr, batches))
    med = {k: statistics.median(v) / args.steps for k, v in times.items()}
    print(f"\n{'':22}{'D+G step s':>12}{'ratio':>8}{'D step s':>12}{'ratio':>8}{'D steps/s':>11}")
    for name in trainers:
        label = name if name == "standard" else f"dp, {name}"
        print(f"{label:22}{med[name, 'step']:12.4f}"
              f"{med[name, 'step'] / med['standard', 'step']:8.2f}{med[name, 'd']:12.4f}"
              f"{med[name, 'd'] / med['standard', 'd']:8.2f}{1 / med[name, 'd']:11.1f}")
    if modes:
        best = min(modes, key=lambda m: med[m, "d"])
        step, d = (med[best, k] / med["standard", k] for k in ("step", "d"))
        print(f"\nfastest correct mode: {best}, dp / standard {d:.2f}x for the D step (goal <= "
              f"1.3x), {step:.2f}x for the whole step")


if __name__ == "__main__":
    main()
