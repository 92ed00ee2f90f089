"""What the studies share: the rows' configurations, training each row's run once
(resumably), and the CSV table."""

import argparse
import csv
import json
import logging
from pathlib import Path

from gankit.config import RESUMABLE_CHANGES, Config, validate
from gankit.runs import RunDir
from gankit.trainer import Trainer

log = logging.getLogger("gankit")

ROOT = Path(__file__).resolve().parents[1]


def study_parser(description: str, default_config: str, *, device: bool = True, seed: bool = True,
                 samples: bool = True) -> argparse.ArgumentParser:
    """The options every study has. Outputs go to runs/<config name> unless --out names
    another folder: committed results (experiments/results/...) change only when asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "configs" / default_config))
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
    """Train (or reuse) one row's run; returns its training seconds."""
    run_path = runs_dir / name
    run = RunDir(run_path)
    if run.checkpoint_path("last").exists():
        ckpt = run.load_checkpoint()
        if ckpt["state"]["epoch"] >= config.train.epochs and same_training(ckpt["config"], config):
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


def parse_value(text: str):
    """A --set value as JSON when it parses (numbers, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def row_configs(spec: dict, base: dict, rows_arg: str, sets: list[str], runs_dir: Path) -> dict[str, Config]:
    """Each wanted row's validated config: the study's base options, then the row's own, then
    the --set overrides (last, so that a quick check shrinks every row alike)."""
    wanted = [r for r in rows_arg.split(",") if r]
    unknown = set(wanted) - set(spec["rows"])
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; the config has {list(spec['rows'])}")
    overrides = {k: parse_value(v) for k, v in (option.split("=", 1) for option in sets)}
    configs = {}
    for name, options in spec["rows"].items():
        if wanted and name not in wanted:
            continue
        configs[name] = Config().updated({**base, **options, **overrides, "out_dir": str(runs_dir),
                                          "name": name})
        validate(configs[name])
    return configs


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
