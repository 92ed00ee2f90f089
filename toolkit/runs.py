"""Run folders: one per run, holding everything needed to inspect, reproduce or resume it.

    <run>/config.json          the full configuration (pass back with --config)
    <run>/history.jsonl        one JSON record per epoch
    <run>/samples/epoch_NNN.png
    <run>/checkpoints/last.safetensors  written at every epoch end (and every N steps if asked)
    <run>/checkpoints/best.safetensors  the epoch with the best --best-metric so far

Checkpoints are state files (toolkit/statefile.py: safetensors and JSON), which run no code
when read; the pickled `.pt` checkpoints of gankit before 0.2 are refused with the one
command that converts a trusted one.
    <run>/tb/                  TensorBoard event files
    <run>/train.log
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.statefile import load_state, save_state


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    history_path = property(lambda self: self.path / "history.jsonl")
    samples = property(lambda self: self.path / "samples")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tb")
    log_path = property(lambda self: self.path / "train.log")

    @classmethod
    def create(cls, config: Config) -> "RunDir":
        t = config.train
        name = t.name or f"{config.model.g_arch}-{config.objective.loss}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = cls(Path(t.out_dir) / name)
        if run.checkpoint_path("last").exists():
            raise UserError(f"run folder {run.path} already holds a run; "
                            f"continue it with --resume {run.path} or pick another --name")
        run.samples.mkdir(parents=True, exist_ok=True)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        config.save(run.config_path)
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        run = cls(path)
        if not run.config_path.is_file():
            raise UserError(f"{path} is not a run folder (no config.json)")
        return run

    def config(self) -> Config:
        return Config.load(self.config_path)

    # --- history -----------------------------------------------------------------------------
    def append_history(self, record: dict) -> None:
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line]

    def truncate_history(self, done: int, key: str = "epoch") -> None:
        """Drop records of epochs (or rounds) after the checkpoint (written just before a crash)."""
        kept = [r for r in self.history() if r[key] <= done]
        self.history_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoints / f"{name}{CHECKPOINT_SUFFIX}"

    def save_checkpoint(self, state: dict, name: str = "last") -> Path:
        """Write atomically: a crash mid-write never leaves a broken checkpoint behind."""
        return save_state(state, self.checkpoint_path(name))

    def load_checkpoint(self, name: str = "last", map_location="cpu") -> dict:
        path = self.checkpoint_path(name)
        if not path.is_file():
            refuse_legacy(path.with_suffix(LEGACY_SUFFIX))
            raise UserError(f"no checkpoint {path}")
        return load_state(path, map_location)


CHECKPOINT_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"


def refuse_legacy(path: Path) -> None:
    """A pickled checkpoint of an older gankit: never unpickled unless the user asks."""
    if Path(path).is_file() and Path(path).suffix == LEGACY_SUFFIX:
        raise UserError(f"{path} is a pickled checkpoint of an older gankit; unpickling can run "
                        "code, so gankit does not read it. If you trust the file, convert it "
                        f"once: gankit convert {path} --trust-pickle")


def find_checkpoint(path: Path, name: str = "last") -> tuple[Optional[RunDir], Path]:
    """A run folder or a checkpoint file -> (run or None, checkpoint path)."""
    path = Path(path)
    if path.is_dir():
        run = RunDir.open(path)
        ckpt = run.checkpoint_path(name)
        if not ckpt.is_file():
            refuse_legacy(ckpt.with_suffix(LEGACY_SUFFIX))
            raise UserError(f"run {path} has no {ckpt.name} checkpoint yet")
        return run, ckpt
    if path.is_file():
        refuse_legacy(path)
        return None, path
    raise UserError(f"no run folder or checkpoint at {path}")
