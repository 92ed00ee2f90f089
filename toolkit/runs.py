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
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from gankit.config import RESUMABLE_CHANGES, Config, run_name_problem
from gankit.errors import UserError
from gankit.files import (FILE_MODE, LinkRefused, append_text, make_folder, parse_json, read_text,
                          refuse_links, write_text)
from gankit.statefile import load_state, save_state


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._created: Optional[Path] = None  # the top-most folder `create` made, if any

    config_path = property(lambda self: self.path / "config.json")
    history_path = property(lambda self: self.path / "history.jsonl")
    samples = property(lambda self: self.path / "samples")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tb")
    log_path = property(lambda self: self.path / "train.log")

    @classmethod
    def create(cls, config: Config) -> "RunDir":
        """A new run's folder. An existing folder is never taken over (only the folder's own
        --resume continues it); a refused run is removed again by `discard_unstarted`."""
        t = config.train
        name = t.name or f"{config.model.g_arch}-{config.objective.loss}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_run_name(name)
        run = cls(Path(t.out_dir) / name)
        if run.path.is_symlink():
            raise LinkRefused(f"{run.path} is a symbolic link; pick another --name")
        if run.path.exists():
            held = run.path.resolve() in _HELD
            entries = sorted(p.name for p in run.path.iterdir()) if run.path.is_dir() else ["?"]
            if entries and entries != ([".lock"] if held else []):
                what = ("holds a run" if run.checkpoint_path("last").exists() or run.history_path.exists()
                        else "exists and is not empty")
                raise UserError(f"{run.path} {what}; continue a run with --resume {run.path}, or "
                                "pick another --name")
        else:
            missing = [p for p in (run.path, *run.path.parents) if not p.exists()]
            make_folder(run.path)
            run._created = missing[-1]  # the top-most folder this run made
        run.lock()  # before anything is written: a second process stops here
        make_folder(run.samples)
        make_folder(run.checkpoints)
        config.save(run.config_path)
        return run

    def discard_unstarted(self) -> None:
        """Remove what `create` made for a run that was refused before it trained: no history
        record and no checkpoint means nothing of value is lost."""
        if self.history_path.exists() or self.checkpoint_path("last").exists():
            return
        self.unlock()
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)  # rmtree never follows links
        else:
            for entry in ("config.json", "samples", "checkpoints", "tb", "train.log"):
                path = self.path / entry
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists() or path.is_symlink():
                    path.unlink()

    def lock(self) -> "RunDir":
        """Hold the folder for this process (released when it exits, even by kill -9): two
        trainers writing one history and checkpoint would corrupt both."""
        import fcntl

        if self.path.resolve() in _HELD:
            return self
        refuse_links(self.path)
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError:
            if (self.path / ".lock").is_symlink():
                raise LinkRefused(f"{self.path / '.lock'} is a symbolic link; remove it") from None
            raise
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"run folder {self.path} is in use by another gankit process; wait "
                            "for it to finish or pick another --name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD[self.path.resolve()] = handle
        return self

    def unlock(self) -> None:
        handle = _HELD.pop(self.path.resolve(), None)
        if handle is not None:
            handle.close()

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        run = cls(path)
        if not run.config_path.is_file() or run.path.is_symlink():
            raise UserError(f"{path} is not a run folder (no config.json)")
        refuse_links(run.path)
        return run

    def config(self) -> Config:
        return Config.load(self.config_path)

    def authoritative_config(self) -> Config:
        """The config a resume must continue: the last checkpoint's. config.json is only a
        readable copy; an edited one (a weaker privacy target, another seed) is refused."""
        readable = self.config()
        if not self.checkpoint_path("last").exists():
            refuse_legacy(self.checkpoint_path("last").with_suffix(LEGACY_SUFFIX))
            return readable
        saved = Config.from_dict(self.load_checkpoint("last").get("config"))
        differ = sorted(k for k, v in saved.flat().items() if readable.flat()[k] != v)
        # An extension (--epochs, --rounds) is written to config.json before the next
        # checkpoint; such options may differ, as they may on the command line.
        extended = {k: readable.flat()[k] for k in differ if k in RESUMABLE_CHANGES}
        differ = [k for k in differ if k not in RESUMABLE_CHANGES]
        if differ:
            raise UserError(f"{self.config_path} differs from the run's checkpoint in "
                            f"{', '.join(differ)}; the checkpoint's config is the run's own. "
                            "Restore config.json, or start a new run with the changed options")
        return saved.updated(extended)

    # --- history -----------------------------------------------------------------------------
    def append_history(self, record: dict) -> None:
        append_text(self.history_path, json.dumps(record) + "\n")

    def history(self) -> list[dict]:
        """Every complete record. A crash in the middle of a write leaves a partial last
        line: it is dropped (the checkpoint it would describe was never written); a broken
        line anywhere else is a damaged file."""
        if not self.history_path.exists():
            return []
        text = read_text(self.history_path, "history", MAX_HISTORY_BYTES)
        lines = [line for line in text.splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                record = parse_json(line, f"{self.history_path} line {i + 1}")
            except UserError:
                if i == len(lines) - 1:
                    break
                raise UserError(f"{self.history_path} line {i + 1} is not a JSON record; "
                                "the history is damaged") from None
            if not isinstance(record, dict):
                raise UserError(f"{self.history_path} line {i + 1} is not a record")
            records.append(record)
        return records

    def truncate_history(self, done: int, key: str = "epoch") -> None:
        """Drop records of epochs (or rounds) after the checkpoint (written just before a crash)."""
        kept = [r for r in self.history() if isinstance(r.get(key), int) and r[key] <= done]
        write_text(self.history_path, "".join(json.dumps(r) + "\n" for r in kept))

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


# Folders this process holds, with their open lock files (the lock lives as long as the file).
_HELD: dict = {}

CHECKPOINT_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
MAX_HISTORY_BYTES = 256 * 2**20  # about a million records


def check_run_name(name: str) -> None:
    problem = run_name_problem(name)
    if problem:
        raise UserError(problem)


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
