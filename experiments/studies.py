"""What the studies share: training each row's run once, resumably."""

import logging
from pathlib import Path

from toolkit.config import Config
from toolkit.runs import RunDir
from toolkit.trainer import Trainer

log = logging.getLogger("toolkit")


def train_row(name: str, config: Config, data, runs_dir: Path) -> float:
    """Train (or reuse) one row's run; returns its training seconds."""
    run_path = runs_dir / name
    run = RunDir(run_path)
    if run.checkpoint_path("last").exists():
        ckpt = run.load_checkpoint()
        if ckpt["state"]["epoch"] >= config.train.epochs and ckpt["config"] == config.to_dict():
            log.info("[%s] reusing the finished run in %s", name, run_path)
            return ckpt["state"]["train_time"]
        if ckpt["config"] != config.to_dict():
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
