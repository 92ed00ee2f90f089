"""The `gankit` command: train, generate, evaluate.

Options are the dataclasses of toolkit.config, parsed with argparse-dataclass. Precedence:
defaults < --preset NAME < --config FILE < options on the command line. User mistakes print one line and
exit with code 2; a diverged run exits 3; Ctrl-C saves and exits 130.

Building the parser imports no torch (`gankit --help` answers at once): each command imports
the torch-based modules it needs when it runs.
"""

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from argparse_dataclass import MISSING, _add_dataclass_options

from gankit.config import BEST_METRICS, GROUPS, RANGES, RESUMABLE_CHANGES, Config, Range, option, validate
from gankit.errors import EXIT_USER_ERROR, ConfigError, TrainingDiverged, UserError, machine_error
from gankit.files import free_path, make_folder, open_append, output_path, refuse_links, write_text
from gankit.presets import PRESETS, describe, preset

log = logging.getLogger("gankit")

EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130


def add_options(parser: argparse.ArgumentParser, options_class, title: str) -> None:
    # argparse-dataclass 2.0 has no public way to put a dataclass's options into an argument
    # group; this helper does exactly that, and setup.cfg pins the release.
    _add_dataclass_options(options_class, parser.add_argument_group(title))


MAX_SAMPLES = 10**6  # images one generate or evaluate call draws; 1e6 MNIST images are 3 GB


def check_ranges(options, ranges: dict) -> None:
    """A command's numeric options against their ranges, all problems in one line."""
    problems = [problem for name, value in dataclasses.asdict(options).items()
                if name in ranges and value is not None
                and (problem := ranges[name].problem(name, value))]
    if problems:
        raise ConfigError(problems)


def given_options(namespace: argparse.Namespace, classes) -> dict:
    """Only the options typed on the command line (the rest come from a config or defaults)."""
    names = {f.name for cls in classes for f in fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not MISSING}


# --- train ---------------------------------------------------------------------------------------

def train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a GAN; writes a run folder",
                       description="Train a GAN. Every option's default is shown; options "
                                   "given here override those of --config.")
    p.add_argument("--config", metavar="FILE", help="start from a saved config.json")
    p.add_argument("--preset", metavar="NAME",
                   help="start from a measured recipe: " + ", ".join(PRESETS) + " (gankit presets "
                        "describes each); --config and options override it")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run exactly where its last checkpoint left off")
    for name, cls in GROUPS.items():
        add_options(p, cls, f"{name} options")
    p.set_defaults(command=train_command)


def resolve_train_config(args: argparse.Namespace) -> tuple[Config, Optional[Path]]:
    given = given_options(args, GROUPS.values())
    if args.resume:
        if args.config or args.preset:
            raise UserError("--resume uses the run's own config.json; drop --config and --preset")
        # late: torch; the parser and --help import no torch
        from gankit.runs import RunDir

        run = RunDir.open(Path(args.resume))
        saved = run.authoritative_config()
        changed = {k: v for k, v in given.items() if saved.flat()[k] != v}
        refused = sorted(set(changed) - RESUMABLE_CHANGES)
        if refused:
            raise UserError(
                "a resumed run keeps its configuration; these options differ from "
                f"{run.config_path}: {', '.join(refused)} (only {', '.join(sorted(RESUMABLE_CHANGES))} "
                "may change)")
        return saved.updated(changed), run.path
    base = Config().updated(preset(args.preset)) if args.preset else Config()
    if args.config:
        base = base.updated(Config.load(Path(args.config)).flat())
    return base.updated(given), None


def train_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.data import load_data
    from gankit.evaluate import training_callbacks
    from gankit.models import check_training_memory
    from gankit.runs import RunDir
    from gankit.trainer import Trainer, resolve_device

    config, resume_dir = resolve_train_config(args)
    validate(config)
    data = load_data(config.data)
    log.info("data: %s", data.description)
    validate(config, data.num_classes)
    check_training_memory(config, data.image_shape, data.num_classes)
    if config.train.mode == "federated":
        return federated_command(config, data, resume_dir)
    callbacks = training_callbacks(config, data, resolve_device(config.train.device))
    run = RunDir.open(resume_dir).lock() if resume_dir is not None else RunDir.create(config)
    try:
        trainer = Trainer(config, data, run, callbacks=callbacks)
        if resume_dir is not None:
            trainer.resume()  # refuses a checkpoint it cannot trust before anything is written
            if trainer.state.epoch >= config.train.epochs:
                raise UserError(f"{run.path} has finished its {trainer.state.epoch} epochs; "
                                "pass a larger --epochs to train longer")
            config.save(run.config_path)  # records an extended --epochs
        log_to_file(run.log_path)
        log.info("run folder: %s", run.path)
        status = trainer.fit()
    except UserError:
        if resume_dir is None:
            run.discard_unstarted()  # a refused run leaves nothing behind
        raise
    if status == "interrupted":
        return EXIT_INTERRUPTED
    log.info("finished: samples in %s, history in %s, checkpoints in %s", run.samples,
             run.history_path, run.checkpoints)
    return 0


def federated_command(config, data, resume_dir) -> int:
    """--mode federated: Flower's simulation engine on this machine (server/simulation.py)."""
    # late: torch; the parser and --help import no torch
    from gankit.evaluate import training_classifier
    from gankit.runs import RunDir

    try:
        # late: Flower, which only --mode federated needs
        from gankit.server.simulation import Interrupted, simulate
    except ImportError as err:
        raise UserError(f"the federated mode needs Flower: pip install 'flwr[simulation]' ({err})") from None
    if resume_dir is not None:
        run = RunDir.open(resume_dir).lock()
        done = run.load_checkpoint("last")["round"] if run.checkpoint_path("last").exists() else 0
        if done >= config.federated.rounds:
            raise UserError(f"{run.path} has finished its {done} rounds; pass a larger --rounds to train longer")
        config.save(run.config_path)  # records an extended --rounds
    else:
        run = RunDir.create(config)
    try:
        log_to_file(run.log_path)
        log.info("run folder: %s", run.path)
        simulate(config, data, run,
                 resume=resume_dir is not None and run.checkpoint_path("last").exists(),
                 classifier=training_classifier(config, data))
    except Interrupted:
        return EXIT_INTERRUPTED
    except UserError:
        if resume_dir is None:
            run.discard_unstarted()  # a refused run leaves nothing behind
        raise
    log.info("finished: samples in %s, history in %s, checkpoints in %s", run.samples,
             run.history_path, run.checkpoints)
    return 0


# --- generate -------------------------------------------------------------------------------------



@dataclass
class GenerateOptions:
    run: str = option("", "run folder or checkpoint file", args=["run"])
    out: str = option("", "output .png (a grid) or .npz (uint8 images x, labels y); "
                          "default: <run>/generated.png")
    mode: str = option("random", "random samples | grid (a 2-D latent plane) | lerp | slerp "
                                 "(paths through --anchors latents) | dirichlet (mixtures of "
                                 "--anchors latents) | classes (conditional: a column per class)")
    num: int = option(64, "images (random, dirichlet, classes: whole rows of one per class)")
    checkpoint: str = option("last", "which checkpoint of a run folder: last | best")
    sigma: Optional[float] = option(None, "latent scale (soft truncation); default: the run's")
    truncation: Optional[float] = option(None, "hard truncation threshold; default: the run's")
    label: Optional[int] = option(None, "conditional models: draw only this class")
    seed: int = option(0, "seed of the latent draws")
    no_ema: bool = option(False, "use the raw generator even when the run kept an EMA")
    nrow: int = option(8, "images per row in a grid (random, dirichlet)")
    anchors: int = option(4, "lerp/slerp/dirichlet: number of random anchor latents")
    steps: int = option(8, "lerp/slerp: images per segment between anchors; grid: rows = columns")
    span: float = option(2.0, "grid: distance from the centre to the edge, in latent units")
    alpha: float = option(1.0, "dirichlet: concentration of the mixing weights")
    drs: bool = option(False, "random mode: discriminator rejection sampling (Azadi et al. 2019)")
    drs_target_rate: float = option(0.2, "DRS: acceptance rate that sets gamma")
    drs_percentile: Optional[float] = option(
        None, "DRS: set gamma to this percentile of the burn-in scores instead (e.g. 80)")
    class_filter: bool = option(False, "random mode, runs trained with --aux-classifier: keep only "
                                       "images D's class head reads as their label (post-processing "
                                       "of D: no privacy cost, no real data)")
    min_confidence: float = option(0.0, "class filter: the class head's least probability for the label")
    force: bool = option(False, "overwrite --out if it exists")


GENERATE_RANGES = {
    "num": Range(1, MAX_SAMPLES), "nrow": Range(1, 1000), "anchors": Range(2, 1000),
    "steps": Range(2, 1000), "span": Range(0, 100, low_open=True), "alpha": Range(0, 1e6, low_open=True),
    "sigma": Range(0, 100, low_open=True), "truncation": RANGES["truncation"], "label": Range(0, 999),
    "seed": RANGES["seed"], "drs_target_rate": Range(0, 1, low_open=True),
    "drs_percentile": Range(0, 100), "min_confidence": Range(0, 1),
}


def generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="draw samples, latent grids and interpolations",
                       description="Draw samples from a trained generator.")
    add_options(p, GenerateOptions, "generate options")
    p.set_defaults(command=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.generate import generate, image_file, write_images

    opts = GenerateOptions(**given_options(args, [GenerateOptions]))
    check_ranges(opts, GENERATE_RANGES)
    options = dataclasses.asdict(opts)
    out, force = options.pop("out"), options.pop("force")
    # Checked before sampling, which can take minutes with --drs. The default never
    # replaces an earlier generated.png: it takes the next free name.
    out = (output_path(image_file(out), force) if out else
           free_path((Path(opts.run) if Path(opts.run).is_dir() else Path(opts.run).parent) / "generated.png"))
    images, labels, nrow = generate(**options)
    write_images(images, labels, nrow, out, force)
    log.info("wrote %d images to %s", len(images), out)
    return 0


# --- evaluate -------------------------------------------------------------------------------------

@dataclass
class EvaluateOptions:
    run: str = option("", "run folder or checkpoint file", args=["run"])
    checkpoint: str = option("last", "which checkpoint of a run folder: last | best")
    num: int = option(10000, "generated samples to evaluate")
    seed: int = option(0, "seed of the latent draws and the metrics' random choices")
    sigma: Optional[float] = option(None, "latent scale (soft truncation); default: the run's")
    truncation: Optional[float] = option(None, "hard truncation threshold; default: the run's")
    drs: bool = option(False, "evaluate discriminator-rejection-sampled images")
    drs_target_rate: float = option(0.2, "DRS: acceptance rate that sets gamma")
    drs_percentile: Optional[float] = option(
        None, "DRS: set gamma to this percentile of the burn-in scores instead (e.g. 80)")
    downstream_epochs: int = option(5, "epochs of the downstream classifier (0 = skip)")
    data_root: str = option("", "where to look for the reference split (default: the run's "
                                "--data-root), e.g. ../shared/data/mnist for the MNIST test split")
    classifier: str = option("", "metric classifier checkpoint (default: the shipped one)")
    k: int = option(3, "k of the k-NN balls for precision, recall, density and coverage")
    sigmas: str = option("", "also sweep the latent scale, e.g. 0.5,0.75,1,1.25: precision, "
                             "recall and FID per sigma (truncation.csv, truncation.png)")
    no_ema: bool = option(False, "use the raw generator even when the run kept an EMA")
    out: str = option("", "output folder (default: <run>/eval/<checkpoint>[-drs], or the next "
                          "free <checkpoint>-2, -3, ...: an earlier evaluation is kept)")
    force: bool = option(False, "write into --out even if it holds an earlier evaluation")


EVALUATE_RANGES = {
    "num": Range(2, MAX_SAMPLES), "seed": RANGES["seed"], "sigma": Range(0, 100, low_open=True),
    "truncation": RANGES["truncation"], "drs_target_rate": Range(0, 1, low_open=True),
    "drs_percentile": Range(0, 100), "downstream_epochs": Range(0, 1000), "k": Range(1, 1000),
}


def evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained generator: JSON and a markdown table",
                       description="Evaluate a run's generator against the real reference split.")
    add_options(p, EvaluateOptions, "evaluate options")
    p.set_defaults(command=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.evaluate import evaluate_run, markdown_table, shown_metrics

    opts = EvaluateOptions(**given_options(args, [EvaluateOptions]))
    check_ranges(opts, EVALUATE_RANGES)
    result, out = evaluate_run(**dataclasses.asdict(opts))
    if "truncation_sweep" in result:
        print(markdown_table(result["truncation_sweep"]))
    print(markdown_table([shown_metrics(result["metrics"])]))
    if "drs_acceptance_rate" in result:
        log.info("rejection sampling accepted %.1f%% of %d draws (gamma %.4g)",
                 100 * result["drs_acceptance_rate"], result["drs_draws"], result["drs_gamma"])
    log.info("wrote %s, metrics.md and prd.png%s", out / "metrics.json",
             ", truncation.csv and truncation.png" if "truncation_sweep" in result else "")
    return 0


# --- export, convert ------------------------------------------------------------------------------

@dataclass
class ExportOptions:
    run: str = option("", "run folder", args=["run"])
    out: str = option("", "folder to write generator.safetensors into")
    checkpoint: str = option("last", "which checkpoint: last | best")
    no_ema: bool = option(False, "export the raw generator even when the run kept an EMA")
    force: bool = option(False, "overwrite a generator.safetensors already in --out")


def export_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.sampling import export_generator

    opts = ExportOptions(**given_options(args, [ExportOptions]))
    if not opts.out:
        raise UserError("--out FOLDER is required")
    path = export_generator(opts.run, Path(opts.out), opts.checkpoint, ema=not opts.no_ema,
                            force=opts.force)
    log.info("wrote %s (%.1f MB): the generator alone; read it with gankit generate %s",
             path, path.stat().st_size / 1e6, opts.out)
    return 0


@dataclass
class ConvertOptions:
    path: str = option("", "a pickled .pt checkpoint of an older gankit, or a run folder",
                       args=["path"])
    trust_pickle: bool = option(False, "required: the file is unpickled (with torch's restricted "
                                       "unpickler: tensors, numpy arrays and plain values only; "
                                       "anything else is refused); convert only files you made "
                                       "yourself")
    force: bool = option(False, "replace a .safetensors checkpoint that is older than its .pt "
                                "(a newer one is never replaced)")


def convert_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    import numpy as np
    import torch

    from gankit.statefile import save_state

    opts = ConvertOptions(**given_options(args, [ConvertOptions]))
    path = Path(opts.path)
    files = sorted((path / "checkpoints").glob("*.pt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() and f.suffix == ".pt" for f in files):
        raise UserError(f"no .pt checkpoint at {path}")
    if not opts.trust_pickle:
        raise UserError("converting unpickles the file (restricted to tensors, arrays and plain "
                        "values); add --trust-pickle if you made it yourself")
    # What an older gankit checkpoint holds beyond tensors and plain values: numpy's RNG state
    # (an array of uint32). Arrays are rebuilt from their bytes; nothing else may be called.
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if path.is_dir():
        refuse_links(path)
    for f in files:
        target = f.with_suffix(".safetensors")
        if target.exists() or target.is_symlink():
            # A conversion never goes back in time: a newer state file is the run's own.
            if target.is_symlink() or target.stat().st_mtime >= f.stat().st_mtime:
                log.info("kept %s: it is newer than %s (already converted, or trained on)", target, f)
                continue
            if not opts.force:
                raise UserError(f"{target} exists (older than {f.name}); pass --force to replace it")
        try:
            with torch.serialization.safe_globals(allowed):
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever a broken or refused pickle raises
            raise UserError(f"{f} could not be read as an older gankit checkpoint "
                            f"({str(err).splitlines()[0][:200]})") from None
        if not isinstance(state, dict) or "config" not in state:
            raise UserError(f"{f} is not a gankit checkpoint")
        state["format"] = 2  # the layout is unchanged; only the file format differs
        save_state(state, target, "replace" if opts.force else "refuse")
        log.info("converted %s -> %s", f, target)
    return 0


def export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's generator alone, for release",
                       description="Write the generator (no discriminator, optimizer or RNG "
                                   "state) as generator.safetensors, which runs no code on "
                                   "load and which gankit generate reads.")
    add_options(p, ExportOptions, "export options")
    p.set_defaults(command=export_command)
    c = sub.add_parser("convert", help="convert a trusted pickled checkpoint of an older gankit",
                       description="Convert .pt checkpoints of an older gankit to .safetensors.")
    add_options(c, ConvertOptions, "convert options")
    c.set_defaults(command=convert_command)


# --- entry point ------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """No abbreviated options (--epoch is not --epochs), and a mistake is one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="runs side by side: a table, and plots of their curves",
                       description="Compare runs: final and best metrics, privacy, times; "
                                   "optionally plots of their curves, precision against recall "
                                   "and a metric against epsilon.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--format", default="markdown", help="markdown | csv (default: markdown)")
    p.add_argument("--out", default="", help="also write the table to this file")
    p.add_argument("--plot", default="", help="write the plots to this .png")
    p.add_argument("--force", action="store_true", help="overwrite --out and --plot if they exist")
    p.add_argument("--metric", default="fid", help="the metric of the curves and of the epsilon "
                                                  "panel (default: fid)")
    p.set_defaults(command=compare_command)


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def compare_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.compare import plot, read_runs, summary, write_table

    if args.metric not in BEST_METRICS:
        raise UserError(f"unknown --metric '{args.metric}' (choose from {', '.join(BEST_METRICS)})")
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot must end in {' or '.join(PLOT_SUFFIXES)}, got {args.plot}")
    for out in (args.out, args.plot):
        if out:
            output_path(Path(out), args.force)  # before any run is read
    runs = read_runs([Path(r) for r in args.runs])
    rows = [summary(run) for run in runs]
    print(write_table(rows, Path(args.out) if args.out else None, args.format, args.force), end="")
    if args.plot:
        plot(runs, rows, Path(args.plot), args.metric, args.force)
        log.info("wrote %s", args.plot)
    return 0


def classifier_parser(sub) -> None:
    p = sub.add_parser("classifier", help="train or check a metric classifier (the feature space "
                                          "of FID, precision, recall)",
                       description="Train or check the CNN whose features the metrics use.")
    actions = p.add_subparsers(metavar="ACTION", required=True, parser_class=Parser)
    data_options = argparse.ArgumentParser(add_help=False)
    data_options.add_argument("--dataset", default="mnist-5k",
                              help="mnist-5k | mnist | fashion-mnist | folder:PATH | npz:PATH "
                                   "(default: mnist-5k, the offline 5,000 images)")
    data_options.add_argument("--data-root", default="data",
                              help="folder of the IDX files for mnist/fashion-mnist (default: data)")
    data_options.add_argument("--test-root", default="",
                              help="folder with the MNIST test files (t10k-*), the test set of "
                                   "mnist-5k (default: --data-root); skipped when absent")
    data_options.add_argument("--download", action="store_true",
                              help="download mnist/fashion-mnist into --data-root when absent")
    data_options.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                              help="cpu | cuda | auto (default: cpu)")
    train = actions.add_parser("train", parents=[data_options], help="train a classifier",
                               description="Train a metric classifier and write it with its "
                                           ".sha256; never over the shipped one unless asked.")
    train.add_argument("--out", required=True, help="checkpoint to write (its .sha256 beside it)")
    train.add_argument("--epochs", type=int, default=30, help="(default: 30)")
    train.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    train.add_argument("--lr", type=float, default=2e-3,
                       help="AdamW learning rate, decayed to 0 on a cosine (default: 0.002)")
    train.add_argument("--no-augment", action="store_true",
                       help="train without the random rotation, translation and scaling")
    train.add_argument("--seed", type=int, default=0, help="(default: 0)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--replace-shipped", action="store_true",
                       help="allow --out to be the shipped classifier (a maintainer's step: the "
                            "digest in gankit/metrics/classifier.py must change with it)")
    train.set_defaults(command=classifier_train_command)
    check = actions.add_parser("check", parents=[data_options],
                               help="verify a classifier's sha256 and measure its test accuracy",
                               description="Verify a classifier checkpoint and measure its accuracy.")
    check.add_argument("path", nargs="?", default="", help="checkpoint (default: the shipped one)")
    check.set_defaults(command=classifier_check_command)


def classifier_train_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    import torch

    from gankit.metrics.classifier import (DEFAULT_CHECKPOINT, accuracy, save_classifier,
                                           train_classifier, training_and_test_data)
    from gankit.trainer import resolve_device

    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UserError("--epochs and --batch-size must be at least 1 and --lr positive")
    device = str(resolve_device(args.device))
    out = Path(args.out)
    if out.resolve() == DEFAULT_CHECKPOINT.resolve() and not args.replace_shipped:
        raise UserError(f"--out {out} is the shipped classifier; write elsewhere, or add "
                        "--replace-shipped if you maintain it")
    if out.suffix != ".pt":
        raise UserError(f"--out must end in .pt, got {out}")
    x, y, test_x, test_y, test_note = training_and_test_data(args.dataset, args.data_root,
                                                             args.test_root or args.data_root,
                                                             download=args.download)
    log.info("training on %s images of %s, %d epochs, augmentation %s, seed %d", f"{len(x):,}",
             args.dataset, args.epochs, "off" if args.no_augment else "on", args.seed)
    start = time.time()
    classifier = train_classifier(x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  augment=not args.no_augment, seed=args.seed, device=device,
                                  progress=not args.no_progress)
    metadata = dict(dataset=args.dataset, train_images=len(x), epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment,
                    seed=args.seed, torch_version=str(torch.__version__))
    if test_x is None:
        log.info("no test set: %s; accuracy not measured", test_note)
    else:
        metadata.update(test_accuracy=accuracy(classifier, test_x, test_y), test_set=test_note)
        log.info("test accuracy on the %s: %.4f", test_note, metadata["test_accuracy"])
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_classifier(classifier, out, **metadata)
    log.info("wrote %s (%.2f MB) in %.0f s, sha256 %s", out, out.stat().st_size / 1e6,
             time.time() - start, digest)
    return 0


def classifier_check_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.metrics.classifier import DEFAULT_CHECKPOINT, accuracy, load_classifier, training_and_test_data
    from gankit.trainer import resolve_device

    path = Path(args.path) if args.path else DEFAULT_CHECKPOINT
    classifier = load_classifier(path, device=str(resolve_device(args.device)))  # verifies the sha256
    print(f"{path}: sha256 verified")
    _, _, test_x, test_y, test_note = training_and_test_data(args.dataset, args.data_root,
                                                             args.test_root or args.data_root,
                                                             download=args.download)
    if test_x is None:
        print(f"no test set: {test_note}; nothing to measure")
        return 0
    recorded = classifier.metadata.get("test_accuracy")
    print(f"test accuracy on the {test_note}: {accuracy(classifier, test_x, test_y):.4f}"
          + (f" (recorded at training: {recorded:.4f})" if recorded is not None else ""))
    return 0


@dataclass
class AuditOptions:
    run: str = option("", "run folder or checkpoint file", args=["run"])
    checkpoint: str = option("last", "which checkpoint of a run folder: last | best")
    n: int = option(0, "training images and as many held-out images scored (0 = the smaller set)")
    seed: int = option(0, "seed of the two random subsets")
    data_root: str = option("", "where the run's data lives now (default: the run's --data-root)")
    out: str = option("", "result file (default: <run>/audit/membership.json, or the next free name)")
    force: bool = option(False, "overwrite --out if it exists")


AUDIT_RANGES = {"n": Range(0, 10**7), "seed": RANGES["seed"]}


def audit_parser(sub) -> None:
    p = sub.add_parser("audit", help="membership-inference audit of a run's discriminator",
                       description="Score the run's training images and held-out images with its "
                                   "discriminator (Hayes et al. 2019) and report the attack's ROC "
                                   "AUC (0.5 = chance) beside the run's accounted epsilon.")
    add_options(p, AuditOptions, "audit options")
    p.set_defaults(command=audit_command)


def audit_command(args: argparse.Namespace) -> int:
    # late: torch; the parser and --help import no torch
    from gankit.audit import audit_discriminator
    from gankit.data import load_data
    from gankit.runs import RunDir
    from gankit.sampling import discriminator_from, read_checkpoint
    from gankit.trainer import refuse_other_data

    opts = AuditOptions(**given_options(args, [AuditOptions]))
    check_ranges(opts, AUDIT_RANGES)
    run_folder = RunDir.open(Path(opts.run)) if Path(opts.run).is_dir() else None
    base = run_folder.path if run_folder is not None else Path(opts.run).parent
    out = output_path(Path(opts.out), opts.force) if opts.out else free_path(base / "audit" / "membership.json")
    ckpt, config, info = read_checkpoint(opts.run, opts.checkpoint)
    data_config = config.data
    if opts.data_root:
        data_config = dataclasses.replace(data_config, data_root=opts.data_root)
    data = load_data(data_config)
    refuse_other_data(ckpt, data, Path(opts.run))  # members must be the run's own images
    D = discriminator_from(ckpt, config, info, where=opts.run)
    result = audit_discriminator(D, (data.train_x, data.train_y), (data.ref_x, data.ref_y),
                                 n=opts.n or None, seed=opts.seed)
    history = run_folder.history() if run_folder is not None else []
    spent = {k: history[-1][k] for k in ("epsilon", "delta", "accountant") if history and k in history[-1]}
    record = {"run": str(opts.run), "checkpoint": opts.checkpoint, "attack": "LOGAN white-box (D's score)",
              "auc": result["auc"], "n_members": result["n_members"],
              "n_nonmembers": result["n_nonmembers"], "seed": opts.seed,
              "member_score_mean": result["member_score_mean"],
              "nonmember_score_mean": result["nonmember_score_mean"],
              "members": data.description, **spent}
    make_folder(out.parent)
    write_text(out, json.dumps(record, indent=2) + "\n", "replace" if opts.force else "refuse")
    budget = (f"accounted epsilon {spent['epsilon']:.3g} (delta {spent['delta']:g})" if "epsilon" in spent
              else "not private")
    print(f"membership AUC {result['auc']:.4f} on {result['n_members']:,} training and "
          f"{result['n_nonmembers']:,} held-out images (0.5 = chance); {budget}")
    log.info("wrote %s", out)
    return 0


# gankit study KIND: the module that runs each kind (its configs ship as gankit.study_configs).
STUDIES = {"dp-sweep": "gankit.dp_sweep", "objective": "gankit.objective_study",
           "federated": "gankit.federated_study", "dp-mnist": "gankit.dp_mnist"}


def study_command_parser(sub) -> None:
    p = sub.add_parser("study", help="run a study: rows trained (in parallel on Ray), evaluated, "
                                     "tabled and plotted; resumable",
                       description="Run a study from its config: " + ", ".join(STUDIES) + ". "
                                   "Options after the kind are the study's own (gankit study "
                                   "KIND --help); without --config the kind's default config, "
                                   "which ships with gankit, is used.",
                       add_help=True)
    p.add_argument("kind", choices=list(STUDIES), help="which study")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the study's options")
    p.set_defaults(command=study_command)


def study_command(args: argparse.Namespace) -> int:
    import importlib

    # A study imports torch, and Ray, Flower or Opacus as its kind needs them: loaded here,
    # not when the parser is built.
    study = importlib.import_module(STUDIES[args.kind])
    try:
        return study.main(args.options)
    except SystemExit as stop:  # the study's own --help, or argparse's one-line usage error
        return EXIT_USER_ERROR if stop.code not in (0, None) else 0


def presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="the measured recipes --preset names, with their results",
                       description="List every preset: what it is for, what it measured and "
                                   "the command that reproduces it.")
    p.set_defaults(command=presets_command)


def presets_command(args: argparse.Namespace) -> int:
    print(describe(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gankit", description="Privacy-aware collaborative GAN training toolkit.")
    sub = parser.add_subparsers(metavar="COMMAND", required=True, parser_class=Parser)
    train_parser(sub)
    generate_parser(sub)
    evaluate_parser(sub)
    export_parser(sub)
    compare_parser(sub)
    classifier_parser(sub)
    presets_parser(sub)
    audit_parser(sub)
    study_command_parser(sub)
    return parser


def setup_logging() -> None:
    """Log lines to the current stderr; one call of main() owns the handlers."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class NoLinkFileHandler(logging.FileHandler):
    """A log file that is never opened through a link placed in the run folder."""

    def _open(self):
        return open_append(self.baseFilename)


def log_to_file(path: Path) -> None:
    handler = NoLinkFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


def main(argv=None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except UserError as err:
        print(f"gankit: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        print(f"gankit: error: {machine_error(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        print(f"gankit: training diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("gankit: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
