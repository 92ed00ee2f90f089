"""Toolkit training step vs a bare hand-written PyTorch loop; images/s per objective.

    python benchmarks/train_step.py                 # DCGAN, batch 64, 60 steps, 3 repeats
    python benchmarks/train_step.py --steps 20 --repeats 1 --objectives bce,wgan-gp

Both loops train the same networks (built by gankit.models from the same seed) on the same
in-memory batches with the same loss. The bare loop is what one would write by hand: sample
z, D step on real and fake, G step. The toolkit number is the Trainer's own loop time
(`train_time_s`, which leaves out the sample grid and checkpoint written once per epoch);
the wall time of the whole epoch is printed beside it. Goal: ratio <= 1.10 on CPU.
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from gankit.config import Config
from gankit.data import ImageData
from gankit.models import build_discriminator, build_generator
from gankit.objectives import OBJECTIVES
from gankit.runs import RunDir
from gankit.trainer import Trainer


def make_data(steps: int, batch: int) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(steps * batch, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(10, (steps * batch,), generator=gen)
    return ImageData(x, y, x[:64], y[:64], "bench", "random images")


def config_for(out: str, steps: int, batch: int, loss: str = "bce", **extra) -> Config:
    return Config().updated(dict(epochs=1, batch_size=batch, loss=loss, out_dir=out,
                                 name=f"{loss}-{time.time_ns()}", progress=False,
                                 tensorboard=False, log_every=10 ** 9, **extra))


def toolkit_run(config: Config, data: ImageData) -> tuple[float, float]:
    """(loop seconds, whole-epoch wall seconds) of the toolkit's Trainer."""
    trainer = Trainer(config, data, RunDir.create(config))
    start = time.perf_counter()
    trainer.fit()
    return trainer.state.train_time, time.perf_counter() - start


def bare_run(config: Config, data: ImageData) -> float:
    """The same training by hand: no trainer, no run folder, no statistics."""
    torch.manual_seed(config.train.seed)
    m, z_dim, b = config.model, config.latent.latent_dim, config.train.batch_size
    G = build_generator(m, z_dim, data.image_shape, 0)
    D = build_discriminator(m, data.image_shape, 0)
    o = config.optim
    g_opt = torch.optim.Adam(G.parameters(), lr=o.g_lr, betas=(o.g_beta1, o.g_beta2))
    d_opt = torch.optim.Adam(D.parameters(), lr=o.d_lr, betas=(o.d_beta1, o.d_beta2))
    order = torch.randperm(len(data.train_x))
    start = time.perf_counter()
    for i in range(len(data.train_x) // b):
        real = data.train_x[order[i * b:(i + 1) * b]]
        with torch.no_grad():
            fake = G(torch.randn(b, z_dim))
        v_real, v_fake = D(real), D(fake)
        d_loss = (F.binary_cross_entropy_with_logits(v_real, torch.ones_like(v_real))
                  + F.binary_cross_entropy_with_logits(v_fake, torch.zeros_like(v_fake)))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        g_loss = F.softplus(-D(G(torch.randn(b, z_dim)))).mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        d_opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--objective-steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DCGAN on 28x28x1, "
          f"batch {args.batch_size}, {args.steps} steps per measurement")
    data = make_data(args.steps, args.batch_size)
    with tempfile.TemporaryDirectory() as out:
        # Warm-up of both paths (allocator, first-call kernel selection).
        warm = make_data(3, args.batch_size)
        toolkit_run(config_for(out, 3, args.batch_size), warm)
        bare_run(config_for(out, 3, args.batch_size), warm)
        bare, loop, wall = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            bare.append(bare_run(config_for(out, args.steps, args.batch_size), data))
            t_loop, t_wall = toolkit_run(config_for(out, args.steps, args.batch_size), data)
            loop.append(t_loop)
            wall.append(t_wall)
        b, t, w = (statistics.median(v) for v in (bare, loop, wall))
        print(f"\n{'':28}{'s/step':>10}{'images/s':>10}")
        print(f"{'bare PyTorch loop':28}{b / args.steps:10.4f}{args.steps * args.batch_size / b:10.0f}")
        print(f"{'toolkit loop':28}{t / args.steps:10.4f}{args.steps * args.batch_size / t:10.0f}")
        print(f"{'toolkit incl. epoch end':28}{w / args.steps:10.4f}{args.steps * args.batch_size / w:10.0f}")
        print(f"\ntoolkit / bare: {t / b:.3f}x (goal <= 1.10x); with the epoch-end grid and "
              f"checkpoint: {w / b:.3f}x")

        print(f"\nimages/s per objective ({args.objective_steps} D steps, n_critic 1):")
        small = make_data(args.objective_steps, args.batch_size)
        for name in args.objectives.split(","):
            t_loop, _ = toolkit_run(config_for(out, args.objective_steps, args.batch_size, name,
                                               n_critic=1), small)
            print(f"  {name:10} {args.objective_steps * args.batch_size / t_loop:8.0f}")


if __name__ == "__main__":
    main()
