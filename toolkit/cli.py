"""The `gankit` command: train, generate.

Options are the dataclasses of toolkit.config, parsed with argparse-dataclass. Precedence:
defaults < --config FILE < options on the command line. User mistakes print one line and
exit with code 2; a diverged run exits 3; Ctrl-C saves and exits 130.
"""

import argparse
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from argparse_dataclass import MISSING, _add_dataclass_options

from toolkit.config import GROUPS, RESUMABLE_CHANGES, Config, option, validate
from toolkit.errors import TrainingDiverged, UserError

log = logging.getLogger("toolkit")

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def add_options(parser: argparse.ArgumentParser, options_class, title: str) -> None:
    # argparse-dataclass 2.0 has no public way to put a dataclass's options into an argument
    # group; this helper does exactly that, and setup.cfg pins the release.
    _add_dataclass_options(options_class, parser.add_argument_group(title))


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
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run exactly where its last checkpoint left off")
    for name, cls in GROUPS.items():
        add_options(p, cls, f"{name} options")
    p.set_defaults(command=train_command)


def resolve_train_config(args: argparse.Namespace) -> tuple[Config, Optional[Path]]:
    given = given_options(args, GROUPS.values())
    if args.resume:
        if args.config:
            raise UserError("--resume uses the run's own config.json; drop --config")
        from toolkit.runs import RunDir

        run = RunDir.open(Path(args.resume))
        saved = run.config()
        changed = {k: v for k, v in given.items() if saved.flat()[k] != v}
        refused = sorted(set(changed) - RESUMABLE_CHANGES)
        if refused:
            raise UserError(
                "a resumed run keeps its configuration; these options differ from "
                f"{run.config_path}: {', '.join(refused)} (only {', '.join(sorted(RESUMABLE_CHANGES))} "
                "may change)")
        return saved.updated(changed), run.path
    base = Config.load(Path(args.config)) if args.config else Config()
    return base.updated(given), None


def train_command(args: argparse.Namespace) -> int:
    from toolkit.data import load_data
    from toolkit.runs import RunDir
    from toolkit.trainer import Trainer

    config, resume_dir = resolve_train_config(args)
    validate(config)
    data = load_data(config.data)
    log.info("data: %s", data.description)
    validate(config, data.num_classes)
    if resume_dir is not None:
        run = RunDir.open(resume_dir)
        config.save(run.config_path)  # records an extended --epochs
    else:
        run = RunDir.create(config)
    log_to_file(run.log_path)
    log.info("run folder: %s", run.path)
    trainer = Trainer(config, data, run)
    if resume_dir is not None:
        trainer.resume()
        if trainer.state.epoch >= config.train.epochs:
            raise UserError(f"{run.path} has finished its {trainer.state.epoch} epochs; "
                            "pass a larger --epochs to train longer")
    status = trainer.fit()
    if status == "interrupted":
        return EXIT_INTERRUPTED
    log.info("finished: samples in %s, history in %s, checkpoints in %s", run.samples,
             run.history_path, run.checkpoints)
    return 0


# --- generate -------------------------------------------------------------------------------------

@dataclass
class GenerateOptions:
    run: str = option("", "run folder or checkpoint file", args=["run"])
    out: str = option("", "output .png (a grid) or .npz (uint8 images x, labels y); "
                          "default: <run>/generated.png")
    num: int = option(64, "number of samples")
    checkpoint: str = option("last", "which checkpoint of a run folder: last | best")
    sigma: Optional[float] = option(None, "latent scale (soft truncation); default: the run's")
    truncation: Optional[float] = option(None, "hard truncation threshold; default: the run's")
    label: Optional[int] = option(None, "conditional models: draw only this class")
    seed: int = option(0, "seed of the latent draws")
    no_ema: bool = option(False, "use the raw generator even when the run kept an EMA")
    nrow: int = option(8, "images per row in a grid")


def generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="draw samples from a trained generator")
    add_options(p, GenerateOptions, "generate options")
    p.set_defaults(command=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torchvision.utils import save_image

    from toolkit.sampling import load_generator, to_uint8

    opts = GenerateOptions(**given_options(args, [GenerateOptions]))
    if opts.num <= 0:
        raise UserError(f"--num must be positive, got {opts.num}")
    gen = load_generator(opts.run, opts.checkpoint, ema=not opts.no_ema)
    labels = None
    if opts.label is not None:
        if not 0 <= opts.label < gen.num_classes:
            raise UserError(f"--label needs a conditional model and a class in [0, {gen.num_classes})")
        labels = torch.full((opts.num,), opts.label)
    images, labels = gen.sample(opts.num, opts.seed, opts.sigma, opts.truncation, labels)
    out = Path(opts.out) if opts.out else (Path(opts.run) if Path(opts.run).is_dir()
                                           else Path(opts.run).parent) / "generated.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"x": to_uint8(images)}
        if labels is not None:
            arrays["y"] = labels.cpu().numpy()
        np.savez_compressed(out, **arrays)
    elif out.suffix == ".png":
        save_image(images, out, nrow=opts.nrow, normalize=True, value_range=(-1, 1))
    else:
        raise UserError(f"--out must end in .png or .npz, got {out}")
    log.info("wrote %d samples to %s", opts.num, out)
    return 0


# --- entry point ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gankit", description="Privacy-aware collaborative GAN training toolkit.")
    sub = parser.add_subparsers(metavar="COMMAND", required=True)
    train_parser(sub)
    generate_parser(sub)
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


def log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
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
