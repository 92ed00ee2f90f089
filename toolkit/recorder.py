"""The end of an epoch (standard and dp training) or of a round (federated), written once.

Both loops hand the recorder the period's record and a way to save a checkpoint. It writes
the sample grid (when due), the history line, TensorBoard scalars and the grid as an image,
a log line with the time per period and an ETA, the last checkpoint, and the best checkpoint
when the record improves on the best so far in its metric's direction.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from gankit.config import BEST_METRICS, Config
from gankit.files import grid_png, write_bytes
from gankit.runs import RunDir

log = logging.getLogger("gankit")

# What the one-line summary of a period shows, when the record has it.
SHOWN = ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "precision", "recall", "fid", "epsilon",
         "client_epsilon")


def improves(metric: str, value, best: Optional[float]) -> bool:
    """Whether `value` of `metric` beats `best` (lower FID, higher precision, ...)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if BEST_METRICS[metric] == "min" else value > best


@torch.no_grad()
def sample_grid(G: nn.Module, prior: nn.Module, num_classes: int, seed: int,
                device: torch.device) -> tuple[Tensor, int]:
    """(images, images per row): the same latents every time, from a generator of their own so
    that the training random stream is untouched; for a conditional G one column per class.
    A learnable prior's current means are used."""
    size, nrow = (num_classes * 8, num_classes) if num_classes else (64, 8)
    labels = (torch.arange(size) % num_classes).to(device) if num_classes else None
    rng = torch.Generator(device=device).manual_seed(seed)
    z = prior.sample(size, generator=rng, device=device)
    was_training = G.training
    G.eval()
    images = G(z, labels)
    G.train(was_training)
    return images, nrow


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Recorder:
    """`unit` is "epoch" or "round"; records carry it as their key and `train_time_s`."""

    def __init__(self, run: RunDir, config: Config, unit: str, total: int):
        self.run, self.config, self.unit, self.total = run, config, unit, total
        self.metric = config.eval.best_metric
        self._writer = None
        self._previous: Optional[tuple[int, float]] = None  # (done, elapsed) of the last period
        self._recent: list[float] = []  # seconds of the last few periods of this session

    @property
    def writer(self):
        """TensorBoard's writer (None when --no-tensorboard)."""
        if self._writer is None and self.config.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run.tensorboard))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def grid_due(self, done: int) -> bool:
        return done % self.config.train.sample_every == 0 or done == self.total

    def end(self, record: dict, best: Optional[float], save: Callable[[str, Optional[float]], None],
            grid: Optional[tuple[Tensor, int]] = None, note: str = "") -> None:
        """Write everything of one finished period. `save(name, best)` writes checkpoint
        `name` holding `best`, the best value so far (this record's when it improved)."""
        done = record[self.unit]
        if grid is not None:
            from torchvision.utils import make_grid

            images, nrow = grid
            write_bytes(self.run.samples / f"{self.unit}_{done:03d}.png", grid_png(images, nrow))
            if self.writer is not None:
                self.writer.add_image("samples", make_grid(images, nrow=nrow, normalize=True,
                                                           value_range=(-1, 1)), done)
        improved = improves(self.metric, record.get(self.metric), best)
        if improved:
            best = float(record[self.metric])
        self.run.append_history(record)
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != self.unit:
                    self.writer.add_scalar(f"{self.unit}/{k}", v, done)
            self.writer.flush()
        self._log(record, done, note)
        save("last", best)
        if improved:
            save("best", best)

    def _log(self, record: dict, done: int, note: str) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                         if k in SHOWN and isinstance(v, (int, float)) and not isinstance(v, bool))
        elapsed = float(record.get("train_time_s", 0.0))
        if self._previous is not None and done > self._previous[0]:
            self._recent = (self._recent + [(elapsed - self._previous[1]) / (done - self._previous[0])])[-5:]
        self._previous = (done, elapsed)
        # The pace of the last periods (a first round also carries Ray's start-up); before
        # there is one, the mean over the run so far. When the last period was slower than
        # that median (the machine got busier), its pace: an ETA that errs long, not short.
        pace = (max(sorted(self._recent)[len(self._recent) // 2], self._recent[-1]) if self._recent
                else elapsed / done if done else 0.0)
        timing = f"{duration(elapsed)}"
        if done and done < self.total and pace:
            timing += f", {pace:.1f}s/{self.unit}, ETA {duration(pace * (self.total - done))}"
        log.info("%s %d/%d %s (%s)%s", self.unit, done, self.total, shown, timing, note)
