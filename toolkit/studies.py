"""What the studies share: the rows' configurations, training each row's run once
(resumably), and the CSV table."""

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Optional

from gankit.config import RESUMABLE_CHANGES, Config, validate
from gankit.presets import preset
from gankit.runs import RunDir
from gankit.trainer import Trainer

log = logging.getLogger("gankit")


def study_parser(description: str, default_config: Path, *, device: bool = True, seed: bool = True,
                 samples: bool = True, parallel: bool = True) -> argparse.ArgumentParser:
    """The options every study has. Outputs go to runs/<config name> unless --out names
    another folder: committed results (experiments/results/...) change only when asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config))
    parser.add_argument("--out", default="", help="default: runs/<config name>; pass "
                        "experiments/results/<config name> to update the committed results")
    parser.add_argument("--data-root", default="", help="overrides the base data root")
    if device:
        parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="", help="comma-separated subset of the config's rows")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a training option of every row (repeatable), e.g. epochs=1")
    if samples:
        parser.add_argument("--samples", type=int, default=0, help="override the generated samples per row")
    if parallel:
        ray = parser.add_argument_group("rows in parallel (Ray)")
        ray.add_argument("--sequential", action="store_true",
                         help="train the rows one after another in this process, without Ray")
        ray.add_argument("--ray-address", default="",
                         help="a Ray cluster to run the rows on (default: a local Ray using every core)")
        ray.add_argument("--cpus-per-row", type=float, default=1.0, help="(default: 1)")
        ray.add_argument("--gpus-per-row", type=float, default=0.0,
                         help="a GPU fraction per row, e.g. 0.25 (default: 0)")
    return parser


def study_out(args: argparse.Namespace) -> Path:
    return Path(args.out or Path("runs") / Path(args.config).stem)


# Options that say where a run lives or how it is shown, not what it trains: a finished run
# moved to another folder or machine is still the same row.
PLACEMENT = RESUMABLE_CHANGES - {"epochs", "rounds"} | {"out_dir", "name", "data_root"}


def same_training(saved: dict, config: Config) -> bool:
    strip = lambda flat: {k: v for k, v in flat.items() if k not in PLACEMENT}  # noqa: E731
    return strip(Config.from_dict(saved).flat()) == strip(config.flat())


def train_row(name: str, config: Config, data, runs_dir: Path) -> float:
    """Train (or reuse) one row's run; returns its training seconds. A row's folder is locked
    while it trains, so two studies (or Ray tasks) never train the same row at once."""
    run = RunDir(runs_dir / name)
    try:
        return _train_row(name, config, data, run)
    finally:
        # Released at once, not when the process exits: a Ray worker outlives its task
        # (and ray.shutdown), and a later study in this machine must be able to reuse the row.
        run.unlock()


def finished_state(run: RunDir, config: Config) -> Optional[dict]:
    """The training state of the run in `run` if it trained `config` to its last epoch, else None."""
    if not run.checkpoint_path("last").exists():
        return None
    ckpt = run.load_checkpoint("last")
    return ckpt["state"] if trained_to_the_end(ckpt, config) else None


def trained_to_the_end(ckpt: dict, config: Config) -> bool:
    return ckpt["state"]["epoch"] >= config.train.epochs and same_training(ckpt["config"], config)


def _train_row(name: str, config: Config, data, run: RunDir) -> float:
    run_path = run.path
    if run.checkpoint_path("last").exists():
        run.lock()
        ckpt = run.load_checkpoint("last")
        if trained_to_the_end(ckpt, config):
            log.info("[%s] reusing the finished run in %s", name, run_path)
            return ckpt["state"]["train_time"]
        if not same_training(ckpt["config"], config):
            raise SystemExit(f"[{name}] {run_path} holds a run of another configuration; "
                             "remove it or choose another --out")
        trainer = Trainer(Config.from_dict(ckpt["config"]), data, run)
        trainer.resume()  # an interrupted study continues where it stopped
    else:
        trainer = Trainer(config, data, RunDir.create(config))
    log.info("[%s] training: %s", name, trainer.run.path)
    status = trainer.fit()
    if status == "stopped":
        # The budget stop of a dp run: its epsilon is what it is; evaluate what it trained.
        log.warning("[%s] stopped before the planned epochs (privacy budget)", name)
    elif status != "done":
        raise SystemExit(f"[{name}] training did not finish")
    return trainer.state.train_time


def train_rows(configs: dict[str, Config], data, runs_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train (or reuse) every row; returns each row's training seconds. By default each row is
    a Ray task (a local Ray over every core, or the cluster at --ray-address) with
    --cpus-per-row cores and --gpus-per-row of a GPU; --sequential trains them here, one
    after another. Either way a finished row is reused and an interrupted one resumes."""
    if args.sequential or (len(configs) <= 1 and not args.ray_address):
        return {name: train_row(name, config, data, runs_dir) for name, config in configs.items()}
    import os
    import sys

    import ray

    # The tasks need gankit where they run; this module travels with them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.ERROR)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR)
    try:
        task = ray.remote(num_cpus=args.cpus_per_row, num_gpus=args.gpus_per_row)(train_row_task)
        threads = max(1, int(args.cpus_per_row))
        pending = {name: task.remote(name, placed(config).to_dict(), str(Path(runs_dir).resolve()), threads)
                   for name, config in longest_first(configs).items()}
        log.info("training %d rows on Ray (%s cores each)", len(pending), args.cpus_per_row)
        seconds = {}
        for name, future in pending.items():
            outcome = ray.get(future)
            if isinstance(outcome, str):  # the row's one-line error
                raise SystemExit(outcome)
            seconds[name] = outcome
        return seconds
    finally:
        ray.shutdown()


def longest_first(configs: dict[str, Config]) -> dict[str, Config]:
    """The rows in the order to submit them: most epochs first (ties in config order), so no
    long row starts late while the other cores sit idle at the end."""
    return dict(sorted(configs.items(), key=lambda item: -item[1].train.epochs))


def placed(config: Config) -> Config:
    """The config with its data root and output folder absolute, for a worker elsewhere."""
    changes = {"out_dir": str(Path(config.train.out_dir).resolve())}
    if Path(config.data.data_root).exists():
        changes["data_root"] = str(Path(config.data.data_root).resolve())
    return config.updated(changes)


def train_row_task(name: str, config: dict, runs_dir: str, threads: int):
    """One row in a Ray worker: its seconds, or its error as one line."""
    import torch

    from gankit.data import load_data
    from gankit.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)
    try:
        row = Config.from_dict(config)
        return train_row(name, row, load_data(row.data), Path(runs_dir))
    except (SystemExit, UserError) as err:
        return f"[{name}] {err}"


def equal_generator_steps(configs: dict[str, Config], train_size: int, g_steps: int) -> dict[str, Config]:
    """Each row's epochs for at least `g_steps` generator steps: objectives that take several
    D steps per G step (WGAN's 5) train proportionally more epochs, so every row's G learns
    for the same number of updates rather than the same number of passes over the data."""
    import math

    from gankit.config import n_critic

    out = {}
    for name, config in configs.items():
        batches = math.ceil(train_size / config.train.batch_size)
        epochs = max(1, math.ceil(g_steps * n_critic(config) / batches))
        out[name] = config.updated({"epochs": epochs})
    return out


def parse_value(text: str):
    """A --set value as JSON when it parses (numbers, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def row_configs(spec: dict, base: dict, rows_arg: str, sets: list[str], runs_dir: Path) -> dict[str, Config]:
    """Each wanted row's validated config: the row's `preset` (if it names one), the study's
    base options, then the row's own, then the --set overrides (last, so that a quick check
    shrinks every row alike)."""
    wanted = [r for r in rows_arg.split(",") if r]
    unknown = set(wanted) - set(spec["rows"])
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; the config has {list(spec['rows'])}")
    overrides = {k: parse_value(v) for k, v in (option.split("=", 1) for option in sets)}
    configs = {}
    for name, options in spec["rows"].items():
        if wanted and name not in wanted:
            continue
        options = dict(options)
        under = preset(options.pop("preset")) if "preset" in options else {}
        configs[name] = Config().updated({**under, **base, **options, **overrides,
                                          "out_dir": str(runs_dir), "name": name})
        validate(configs[name])
    return configs


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
