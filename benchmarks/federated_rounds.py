"""Simulated federated training vs standard training of the same number of steps.

    python benchmarks/federated_rounds.py                       # K=4 clients, R=5 rounds, S=50
    python benchmarks/federated_rounds.py --local-steps 100 --dataset mnist-5k

Federated: K clients x R rounds x S local D steps in Flower's simulation engine (Ray, one
virtual SuperNode per client, `--client-cpus` cores each, so 2 clients train at once on 2
cores), the project's ClientApp and server, no evaluation. Standard: one Trainer of the same
config taking S*K*R D steps on all the data with every core. Both see the same images,
batch size and model. The ratio federated / standard is what federating costs in wall time;
goal: at most 1.5x on CPU for K=4, R=5.

Federated time is split into Ray's start-up (measured with a 1-round, 1-step simulation)
and the rest, since the start-up does not grow with the work. `--simulation inline` times
the same rounds with every client in this process, one after another (no Ray); `--clients
1000 --fraction-train 0.01 --local-steps 1` shows the per-message cost that it removes.
"""

import argparse
import logging
import os
import sys
import tempfile
import time

import torch

from gankit.config import Config
from gankit.data import load_data
from gankit.runs import RunDir
from gankit.trainer import Trainer


def federated_seconds(config: Config, data) -> float:
    from gankit.server.simulation import simulate

    run = RunDir.create(config)
    started = time.perf_counter()
    simulate(config, data, run)
    return time.perf_counter() - started


def standard_seconds(config: Config, data, steps: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = Trainer(config.updated({"mode": "standard", "name": "standard"}), data, None)
    started = time.perf_counter()
    trainer.train_steps(steps)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--width", type=int, default=32, help="G and D width (conditional DCGAN)")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--simulation", choices=("ray", "inline"), default="ray")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    out = tempfile.mkdtemp(prefix="fed_bench_")
    config = Config().updated(dict(
        mode="federated", dataset=args.dataset, conditional=True, g_width=args.width,
        d_width=args.width, batch_size=64, clients=args.clients, rounds=args.rounds,
        local_steps=args.local_steps, client_cpus=args.client_cpus, eval_every=0,
        fraction_train=args.fraction_train, simulation=args.simulation,
        sample_every=10 ** 6, out_dir=out, name="federated", progress=False, tensorboard=False))
    data = load_data(config.data)
    sampled = max(1, int(args.clients * args.fraction_train))
    total = sampled * args.rounds * args.local_steps
    print(f"{data.description}; conditional DCGAN width {args.width}, batch 64; "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")

    startup = federated_seconds(config.updated({"rounds": 1, "local_steps": 1, "clients": 2,
                                                "name": "startup"}), data)
    federated = federated_seconds(config, data)
    standard = standard_seconds(config, data, total)
    print(f"standard:  {total} D steps                          {standard:7.1f} s")
    print(f"federated ({args.simulation}): {sampled} clients a round x {args.rounds} rounds x "
          f"{args.local_steps} steps = {total}   {federated:7.1f} s  (start-up and teardown "
          f"about {startup:.1f} s)")
    print(f"ratio federated / standard: {federated / standard:.2f}x (goal <= 1.5x); "
          f"without the start-up: {(federated - startup) / standard:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
