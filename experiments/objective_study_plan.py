"""How long each row of an objective-study config will train, measured before it runs.

    python experiments/objective_study_plan.py                         # the CPU config, 1 thread a row
    python experiments/objective_study_plan.py --config experiments/configs/objective_study_cpu.json \
        --data-root ../shared/data/mnist --steps 60 --cores 2 --out runs/objective_study_plan.md

Each row trains --steps D steps (after a few warm-up steps that are not timed) with its own
options on the first images of the config's data, one thread, as a row does on Ray with
--cpus-per-row 1. Its seconds per D step times the D steps the study will give it (the
config's epochs, or the epochs its "g_steps" implies, times the batches of an epoch of the
config's training set) is its predicted training time. The total wall time assumes --cores
rows at a time, longest first. Evaluation (samples, DRS, the truncation sweep, downstream
accuracy) comes on top and is not predicted here.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from gankit.config import n_critic
from gankit.errors import StudyError
from gankit.data import ImageData, load_data
from gankit.evaluate import markdown_table
from gankit.runs import RunDir
from gankit.studies import equal_generator_steps, row_configs, run_study
from gankit.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent / "configs"


def seconds_per_d_step(config, data: ImageData, steps: int, warmup: int = 5) -> float:
    """The Trainer's own loop time per D step over `steps` steps, after `warmup` untimed ones.
    The first short run is thrown away: it carries the process's one-time start-up costs."""
    times = []
    for n in (warmup, warmup, warmup + steps):
        with tempfile.TemporaryDirectory() as out:
            run_config = config.updated({"epochs": 1, "out_dir": out, "eval_every": 0,
                                         "sample_every": 10 ** 6, "checkpoint_every": 0})
            size = n * config.train.batch_size
            if size > len(data.train_x):
                raise StudyError(f"--steps {steps} needs {size:,} training images; the data has "
                                 f"{len(data.train_x):,}")
            subset = ImageData(data.train_x[:size], None if data.train_y is None else data.train_y[:size],
                               data.ref_x, data.ref_y, data.name, data.description)
            trainer = Trainer(run_config, subset, RunDir.create(run_config))
            trainer.fit()
            times.append(trainer.state.train_time)
    return (times[2] - times[1]) / steps


def longest_first_makespan(seconds: list[float], cores: int) -> float:
    """Wall time when `cores` rows train at a time, each next row on the first free core."""
    free = [0.0] * cores
    for s in sorted(seconds, reverse=True):
        i = free.index(min(free))
        free[i] += s
    return max(free)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "objective_study_cpu.json")
    parser.add_argument("--data-root", default="", help="overrides the base data root")
    parser.add_argument("--rows", default="", help="comma-separated subset of the config's rows")
    parser.add_argument("--steps", type=int, default=40, help="timed D steps per row")
    parser.add_argument("--cores", type=int, default=2, help="rows trained at a time")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    if args.steps < 1 or args.cores < 1:
        parser.error("--steps and --cores must be positive")
    torch.set_num_threads(1)

    spec = json.loads(args.config.read_text())
    base = dict(spec["base"])
    if args.data_root:
        base["data_root"] = args.data_root
    configs = row_configs(spec, base, args.rows, [], Path(tempfile.gettempdir()))
    # The study's own data (the reference split held out), for its epoch length and the timing.
    data = load_data(next(iter(configs.values())).data)
    train_size = len(data.train_x)
    if "g_steps" in spec:
        configs = equal_generator_steps(configs, train_size, int(spec["g_steps"]))
    table = []
    for name, config in configs.items():
        per_step = seconds_per_d_step(config, data, args.steps)
        d_steps = config.train.epochs * math.ceil(train_size / config.train.batch_size)
        table.append({"row": name, "epochs": config.train.epochs, "d_steps": d_steps,
                      "g_steps": d_steps // n_critic(config), "s_per_d_step": round(per_step, 4),
                      "train_min": round(per_step * d_steps / 60, 1)})
        print(f"[{name}] {per_step:.4f} s per D step, {d_steps:,} D steps: "
              f"{per_step * d_steps / 60:.1f} min", flush=True)
    total = sum(r["train_min"] for r in table)
    wall = longest_first_makespan([r["train_min"] for r in table], args.cores)
    text = (f"# Training time per row: {args.config.name}\n\n"
            f"Measured with `python {' '.join(sys.argv)}` ({args.steps} timed D steps a row, one "
            f"thread). {total:.0f} core-minutes of training; {wall:.0f} min of wall time with "
            f"{args.cores} rows at a time, longest first; evaluation not included.\n\n"
            + markdown_table(table, list(table[0])))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_study(main))
