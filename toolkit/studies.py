"""What the studies share: the rows' configurations, training each row's run once
(resumably), and the CSV table."""

import argparse
import csv
import importlib.resources
import json
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from gankit.config import MAX_CONFIG_BYTES, RESUMABLE_CHANGES, Config, n_critic, validate
from gankit.data import ImageData, load_data
from gankit.errors import EXIT_USER_ERROR, StudyError, UserError, machine_error
from gankit.files import parse_json, read_text
from gankit.presets import preset
from gankit.runs import RunDir
from gankit.trainer import Trainer

log = logging.getLogger("gankit")


def study_config(name: str) -> Path:
    """A study config that ships with gankit (experiments/configs/, installed as the package
    data gankit.study_configs)."""
    return Path(str(importlib.resources.files("gankit.study_configs") / name))


def read_spec(path) -> dict:
    """A study config: a JSON object, read with gankit's bounded reader (one line if not)."""
    spec = parse_json(read_text(Path(path), "study config", MAX_CONFIG_BYTES), f"study config {path}")
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), dict):
        raise StudyError(f"study config {path} must be a JSON object with a 'rows' object")
    return spec


def command_line() -> str:
    """This process's command as a user would type it again, for a table's Command: line."""
    if Path(sys.argv[0]).name == "gankit":
        return " ".join(["gankit", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def run_study(main: Callable[[], int]) -> int:
    """A study script's exit code: its main's, or 2 with one line on stderr for a user's
    mistake (a missing data folder, an invalid --set value, an unreadable config), as the
    gankit CLI reports one; anything else is a bug and keeps its traceback."""
    prog = Path(sys.argv[0]).name
    try:
        return main()
    except UserError as err:
        message = str(err)
    except json.JSONDecodeError as err:
        message = f"the config is not valid JSON: {err}"
    except OSError as err:
        message = machine_error(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def study_parser(description: str, default_config: Path, *, device: bool = True, seed: bool = True,
                 samples: bool = True, parallel: bool = True) -> argparse.ArgumentParser:
    """The options every study has. Outputs go to runs/<config name> unless --out names
    another folder: committed results (experiments/results/...) change only when asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config),
                        help=f"the study's config (default: {default_config})")
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
    parser.add_argument("--evaluate-only", action="store_true",
                        help="table the finished rows and the committed evaluations of rows whose "
                             "run folders are elsewhere; never train")
    if parallel:
        ray = parser.add_argument_group("rows in parallel (Ray)")
        ray.add_argument("--sequential", action="store_true",
                         help="train the rows one after another in this process, without Ray")
        ray.add_argument("--ray-address", default="",
                         help="a Ray cluster to run the rows on (default: a local Ray using every core)")
        ray.add_argument("--cpus-per-row", type=float, default=1.0, help="(default: 1)")
        ray.add_argument("--gpus-per-row", type=float, default=None,
                         help=f"a GPU fraction per row, e.g. 0.5 (default: {GPU_SHARE} when the rows "
                              "train on a GPU, else 0)")
    return parser


# The default GPU fraction of a row that trains on a GPU: the studies' MNIST networks are small,
# so four rows share one GPU. A Ray task that reserves no GPU sees none (Ray empties
# CUDA_VISIBLE_DEVICES for it), so a GPU row must always reserve some.
GPU_SHARE = 0.25


def gpus_per_row(args: argparse.Namespace, configs: dict[str, Config]) -> float:
    """The GPU fraction each row's Ray task reserves: --gpus-per-row, or GPU_SHARE when any row
    trains on a GPU (--device cuda, or auto on a machine with one)."""
    on_gpu = any(c.train.device == "cuda" or (c.train.device == "auto" and torch.cuda.is_available())
                 for c in configs.values())
    share = getattr(args, "gpus_per_row", None)
    if share is None:
        return GPU_SHARE if on_gpu else 0.0
    if share < 0:
        raise StudyError(f"--gpus-per-row must be >= 0, got {share}")
    if on_gpu and share == 0:
        raise StudyError("--gpus-per-row 0 hides the GPU from every row, but the rows train on "
                         "--device cuda; give a fraction such as 0.25")
    return share


def study_out(args: argparse.Namespace) -> Path:
    return Path(args.out or Path("runs") / Path(args.config).stem)


# Options that say where a run lives or how it is shown, not what it trains: a finished run
# moved to another folder or machine is still the same row.
PLACEMENT = RESUMABLE_CHANGES - {"epochs", "rounds"} | {"out_dir", "name", "data_root"}


def same_training(saved: dict, config: Config) -> bool:
    strip = lambda flat: {k: v for k, v in flat.items() if k not in PLACEMENT}  # noqa: E731
    return strip(Config.from_dict(saved).flat()) == strip(config.flat())


class Evaluations:
    """A study's evaluations/<row>.json: what each row measured, with the evaluation settings
    (`key`) and the training config it measured. Run folders stay out of git, so a row trained
    on another machine is tabled from its evaluation and never trained again: a study lands
    row by row, and --rows never shrinks its table."""

    def __init__(self, out: Path):
        self.folder = out / "evaluations"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def matching(self, name: str, key: dict, config: Config) -> Optional[dict]:
        """The row's evaluation if it measured this training with these settings, else None."""
        path = self.path(name)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("key") == key and same_training(saved.get("config", {}), config):
            return saved
        return None

    def save(self, name: str, key: dict, config: Config, **measured) -> dict:
        record = {"key": key, "config": config.to_dict(), **measured}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path(name).write_text(json.dumps(record, indent=1))
        return record


def evaluation_key(ev: dict, seed: int, config: Config) -> dict:
    """What a committed evaluation of an epoch-based row must have measured to be tabled."""
    return {"evaluation": ev, "seed": seed, "epochs": config.train.epochs}


def land_rows(configs: dict[str, Config], wanted: set[str], out: Path, ev: dict, data,
              args: argparse.Namespace, evaluate: Callable[[str, RunDir], dict]) -> tuple[dict[str, dict], list[str]]:
    """Train the wanted rows that need it, measure each finished run not measured yet with
    `evaluate(name, run)` (what it returns is saved as the row's evaluation, keyed by the
    evaluation settings `ev`, --seed and the row's epochs), and return every measured row's
    evaluation (in config order) and the rows still pending.

    A row measured before (its evaluation committed, its run folder perhaps on another
    machine) is tabled from that evaluation and never trained again; --evaluate-only trains
    nothing. A run folder whose training time differs from its evaluation's (trained again)
    is measured again."""
    evaluations = Evaluations(out)
    keys = {name: evaluation_key(ev, args.seed, config) for name, config in configs.items()}
    committed = {name: evaluations.matching(name, keys[name], config) for name, config in configs.items()}
    to_train = {name: config for name, config in configs.items() if name in wanted
                and (committed[name] is None or (out / "runs" / name).is_dir())}
    if to_train and not args.evaluate_only:
        train_rows(to_train, data, out / "runs", args)  # in parallel on Ray by default
    measured, pending = {}, []
    for name, config in configs.items():
        run = RunDir(out / "runs" / name)
        state = finished_state(run, config)
        saved = committed[name]
        if state is None and saved is None:
            pending.append(name)
            log.info("[%s] neither a finished run nor a committed evaluation; not tabled", name)
            continue
        train_time = None if state is None else round(state["train_time"], 1)
        if state is not None and not (saved and saved["train_time_s"] == train_time):
            saved = evaluations.save(name, keys[name], config, train_time_s=train_time,
                                     **evaluate(name, run))
        else:
            log.info("[%s] its evaluation is reused", name)
        measured[name] = saved
    return measured, pending


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


def start_afresh(run: RunDir) -> None:
    """Empty a row folder that started but finished no round (its lock file stays: held)."""
    for child in run.path.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def held_row(runs_dir: Path, name: str) -> RunDir:
    """The row's folder, locked for this process: two studies (or Ray tasks) never train it at once."""
    run = RunDir(runs_dir / name)
    run.path.mkdir(parents=True, exist_ok=True)
    return run.lock()


def _train_row(name: str, config: Config, data, run: RunDir) -> float:
    run_path = run.path
    if run.checkpoint_path("last").exists():
        run.lock()
        ckpt = run.load_checkpoint("last")
        if trained_to_the_end(ckpt, config):
            log.info("[%s] reusing the finished run in %s", name, run_path)
            return ckpt["state"]["train_time"]
        if not same_training(ckpt["config"], config):
            raise StudyError(f"[{name}] {run_path} holds a run of another configuration; "
                             "remove it or choose another --out")
        trainer = Trainer(Config.from_dict(ckpt["config"]), data, run)
        trainer.resume()  # an interrupted study continues where it stopped
    else:
        if run.path.is_dir():  # a row that started but saved no checkpoint starts again
            start_afresh(held_row(run.path.parent, name))
        trainer = Trainer(config, data, RunDir.create(config))
    log.info("[%s] training: %s", name, trainer.run.path)
    status = trainer.fit()
    if status == "stopped":
        # The budget stop of a dp run: its epsilon is what it is; evaluate what it trained.
        log.warning("[%s] stopped before the planned epochs (privacy budget)", name)
    elif status != "done":
        raise StudyError(f"[{name}] training did not finish")
    return trainer.state.train_time


def on_ray(args: argparse.Namespace, configs: dict) -> bool:
    """Whether train_rows runs the rows as Ray tasks: unless --sequential, when there is more
    than one row or a cluster to run on."""
    return not args.sequential and (len(configs) > 1 or bool(args.ray_address))


def train_rows(configs: dict[str, Config], data, runs_dir: Path, args: argparse.Namespace,
               train: Callable = train_row) -> dict[str, Optional[float]]:
    """Train (or reuse) every row with `train(name, config, data, runs_dir)`, which returns the
    row's training seconds (None where it does not know them); returns those per row. By
    default each row is a Ray task (a local Ray over every core, or the cluster at
    --ray-address) with --cpus-per-row cores and --gpus-per-row of a GPU; --sequential trains
    them here, one after another. Either way a finished row is reused, an interrupted one
    resumes, and a row's folder is locked while it trains, so no row trains twice."""
    if not on_ray(args, configs):
        return {name: train(name, config, data, runs_dir) for name, config in configs.items()}
    import ray  # late: Ray starts only for rows trained in parallel (not --sequential)

    # The tasks need gankit where they run; this module travels with them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # A row that reserves no GPU must see none (it would use it unreserved with device auto):
    # Ray hides them from such tasks today and warns that a future version will not. Keep the
    # hiding explicitly (for a local Ray; a cluster's own setting decides there), so the tip
    # does not apply.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        if args.ray_address:
            ray.init(address=args.ray_address, logging_level=logging.ERROR)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR)
    try:
        gpus = gpus_per_row(args, configs)
        task = ray.remote(num_cpus=args.cpus_per_row, num_gpus=gpus)(train_row_task)
        threads = max(1, int(args.cpus_per_row))
        pending = {name: task.remote(name, placed(config).to_dict(), str(Path(runs_dir).resolve()), threads, train)
                   for name, config in longest_first(configs).items()}
        log.info("training %d rows on Ray (%s cores%s each)", len(pending), args.cpus_per_row,
                 f" and {gpus} of a GPU" if gpus else "")
        seconds = {}
        for name, future in pending.items():
            outcome = ray.get(future)
            if isinstance(outcome, str):  # the row's one-line error (seconds are a number or None)
                raise StudyError(outcome)
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


def train_row_task(name: str, config: dict, runs_dir: str, threads: int, train: Callable):
    """One row in a Ray worker: its seconds, or its error as one line."""
    # The row's own log lines only: the root logger at INFO would also pass on every library's
    # (Flower's database layer announces each of its plugins).
    if not log.handlers:  # a Ray worker runs many tasks
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    torch.set_num_threads(threads)
    try:
        row = Config.from_dict(config)
        return train(name, row, load_data(row.data), Path(runs_dir))
    except UserError as err:
        return f"[{name}] {err}"


def equal_generator_steps(configs: dict[str, Config], train_size: int, g_steps: int) -> dict[str, Config]:
    """Each row's epochs for at least `g_steps` generator steps: objectives that take several
    D steps per G step (WGAN's 5) train proportionally more epochs, so every row's G learns
    for the same number of updates rather than the same number of passes over the data."""
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


def chosen_rows(spec: dict, rows_arg: str) -> set[str]:
    """The rows --rows names (comma-separated; empty: every row of the config)."""
    wanted = {r for r in rows_arg.split(",") if r}
    unknown = wanted - set(spec["rows"])
    if unknown:
        raise StudyError(f"unknown rows {sorted(unknown)}; the config has {list(spec['rows'])}")
    return wanted or set(spec["rows"])


def study_rows(spec: dict, args: argparse.Namespace, out: Path) -> tuple[dict[str, Config], set[str], ImageData]:
    """A study's rows as the shared parser's options shape them: every row's config (the
    table lists every row that is measured, so a study landed a few rows at a time keeps one
    whole table), the rows --rows chooses to train, and the data they share."""
    base = dict(spec["base"], seed=args.seed, device=args.device)
    if args.data_root:
        base["data_root"] = args.data_root
    configs = row_configs(spec, base, "", args.set, out / "runs")
    wanted = chosen_rows(spec, args.rows)  # an unknown row is refused before the data loads
    data = load_data(next(iter(configs.values())).data)
    log.info("data: %s", data.description)
    return configs, wanted, data


def row_configs(spec: dict, base: dict, rows_arg: str, sets: list[str], runs_dir: Path) -> dict[str, Config]:
    """Each wanted row's validated config: the row's `preset` (if it names one), the study's
    base options, then the row's own, then the --set overrides (last, so that a quick check
    shrinks every row alike)."""
    wanted = chosen_rows(spec, rows_arg)
    malformed = [option for option in sets if "=" not in option]
    if malformed:
        raise StudyError(f"--set takes OPTION=VALUE (e.g. --set epochs=1), got {malformed}")
    overrides = {k: parse_value(v) for k, v in (option.split("=", 1) for option in sets)}
    configs = {}
    for name, options in spec["rows"].items():
        if name not in wanted:
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
