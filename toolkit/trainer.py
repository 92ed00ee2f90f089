"""The one training loop.

Global steps over epochs of real batches: every batch is one discriminator step, and a
generator step follows whenever the D-step schedule says so (every n_critic-th D step, or
the adaptive ladder of toolkit/schedule.py). The D and G steps are free functions
(toolkit/steps.py); the mode prepares D, its optimizer, its batches and its D step, so a
private discriminator runs through the same loop without the loop knowing.

At each epoch end: history record, sample grid, callbacks (evaluation), checkpoints. Ctrl-C
finishes the current step, saves a checkpoint and stops; a non-finite loss stops the run
and keeps the last good checkpoint. Resume restores networks, optimizers, schedulers, EMA,
mode state, RNG states and the position inside the epoch, so it continues bit-exactly.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from gankit.config import Config, n_critic, privacy_facts, validate
from gankit.data import ImageData, ShuffledBatches
from gankit.errors import TrainingDiverged, UserError
from gankit.latent import build_prior
from gankit.models import build_generator, discriminator_for
from gankit.modes import DiscriminatorParts, Mode, StandardMode
from gankit.objectives import get_objective
from gankit.recorder import Recorder, sample_grid
from gankit.runs import RunDir
from gankit.schedule import DStepSchedule
from gankit.steps import StepContext, discriminator_step, generator_step

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: state files (toolkit/statefile.py); 1 was pickled


# --- Checkpoints and EMA ---------------------------------------------------------------------

def checkpoint_header(config: Config, data: ImageData, num_classes: int) -> dict:
    """What every checkpoint starts with, so that `load_generator` rebuilds its networks."""
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
            "privacy": privacy_facts(config),
            "data": {"image_shape": list(data.image_shape), "num_classes": num_classes,
                     "name": data.name, "fingerprint": data.fingerprint()}}


def refuse_other_data(ckpt: dict, data: ImageData, checkpoint: Path) -> None:
    """A resume may find its data elsewhere (--data-root may change), never other data.
    Checkpoints written before the fingerprint existed carry none and are not checked."""
    info = ckpt.get("data")
    saved = info.get("fingerprint") if isinstance(info, dict) else None
    if saved is not None and saved != data.fingerprint():
        raise UserError(f"{checkpoint} was trained on other data than '{data.description}'; "
                        "point --data-root at the run's own data")


def ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates.

    A plain EMA starts from G's random initial weights, which still weigh decay**n after
    n updates (a third after 1,100 steps at 0.999): short runs then sample washed-out
    grey images. The ramp (as in TensorFlow's ExponentialMovingAverage num_updates)
    forgets the initial weights quickly and reaches the full decay later.
    """
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:
                avg.copy_(cur)  # integer buffers such as BatchNorm's step counter
    return update


# --- State and callbacks --------------------------------------------------------------------------

@dataclass
class TrainState:
    epoch: int = 0          # completed epochs
    batch: int = 0          # batches done in the current epoch
    step: int = 0           # discriminator steps overall
    g_steps: int = 0
    train_time: float = 0.0
    best: Optional[float] = None
    sums: dict = field(default_factory=dict)   # running sums of this epoch's step stats
    counts: dict = field(default_factory=dict)

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class Callback:
    """Hooks for work around the loop; `on_epoch_end` may add entries to the record."""

    def on_step_end(self, trainer: "Trainer", stats: dict) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        pass


# --- The mode --------------------------------------------------------------------------------------

def _private_mode():
    # late: toolkit/privacy.py is the only module that imports Opacus, which only --mode dp needs
    from gankit.privacy import PrivateMode

    return PrivateMode()


MODES = {"standard": StandardMode, "dp": _private_mode}


def build_mode(name: str) -> Mode:
    if name == "federated":
        # Many Trainers, one per client and round, under Flower: server/ and clients/.
        raise UserError("the federated mode is not a single training loop: run it with "
                        "`gankit train --mode federated` (server/simulation.py)")
    return MODES[name]()


# --- The trainer ------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, config: Config, data: ImageData, run: Optional[RunDir], mode=None,
                 callbacks: tuple = ()):
        validate(config, data.num_classes)
        self.config, self.data, self.run = config, data, run
        t = config.train
        self.device = resolve_device(t.device)
        seed_everything(t.seed)
        self.num_classes = data.num_classes if config.model.conditional else 0
        self.G = build_generator(config.model, config.latent.latent_dim, data.image_shape,
                                 self.num_classes).to(self.device)
        self.D = discriminator_for(config, data.image_shape, self.num_classes).to(self.device)
        self.prior = build_prior(config.latent, t.seed).to(self.device)
        self.objective = get_objective(config.objective.loss)
        self.n_critic = n_critic(config)
        o = config.optim
        self.g_opt = generator_optimizer(self.G, self.prior, o)
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=o.d_lr, betas=(o.d_beta1, o.d_beta2))
        self.schedulers = [self._scheduler(opt) for opt in (self.g_opt, self.d_opt)]
        self.ema = (AveragedModel(self.G, multi_avg_fn=ema_with_warmup(o.ema_decay),
                                  use_buffers=True) if o.ema_decay else None)
        labels = data.train_y if config.model.conditional else None
        batches = ShuffledBatches(data.train_x.to(self.device),
                                  None if labels is None else labels.to(self.device),
                                  t.batch_size, t.seed)
        label_counts = None
        if self.num_classes and config.latent.fake_labels == "data":
            label_counts = torch.bincount(data.train_y, minlength=self.num_classes).float().to(self.device)
        self.ctx = StepContext(self.G, self.prior, self.objective, config, self.num_classes,
                               self.device, label_counts=label_counts)
        # The mode prepares what it changes (the dp mode: a private D, its optimizer, Poisson
        # batches and its D step) and hands it back; the loop runs whatever it returns.
        self.mode = mode or build_mode(t.mode)
        parts = self.mode.prepare(DiscriminatorParts(self.D, self.d_opt, batches,
                                                     discriminator_step), config)
        self.D, self.d_opt, self.batches, self.d_step = parts
        ob = config.objective
        self.schedule = DStepSchedule(ob.d_steps_schedule, self.n_critic, ob.d_steps_threshold,
                                      ob.d_steps_grace, ob.d_steps_beta)
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.stop_requested = False
        # False for a federated client that trains D alone (--sync d: G trains on the server).
        self.train_generator = True
        # A federated client's local trainer has no run folder and records nothing.
        self.recorder = Recorder(run, config, "epoch", t.epochs) if run is not None else None

    def _scheduler(self, opt):
        o = self.config.optim
        if o.lr_decay == "linear":
            total = self.config.train.epochs
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, 1.0 - e / total))
        if o.lr_decay == "exponential":
            return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.lr_gamma)
        return None

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator to draw samples from: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.G

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.state
        return {
            **checkpoint_header(self.config, self.data, self.num_classes),
            "state": {k: getattr(s, k) for k in ("epoch", "batch", "step", "g_steps", "train_time",
                                                  "best", "sums", "counts")},
            "G": self.G.state_dict(),
            "D": unwrapped(self.D).state_dict(),
            "prior": self.prior.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "schedulers": [sch.state_dict() if sch else None for sch in self.schedulers],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "mode": self.mode.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.G.load_state_dict(ckpt["G"])
        unwrapped(self.D).load_state_dict(ckpt["D"])
        self.prior.load_state_dict(ckpt["prior"])
        self.g_opt.load_state_dict(ckpt["g_opt"])
        self.d_opt.load_state_dict(ckpt["d_opt"])
        for sch, sd in zip(self.schedulers, ckpt["schedulers"]):
            if sch is not None and sd is not None:
                sch.load_state_dict(sd)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.mode.load_state_dict(ckpt["mode"])
        self.schedule.load_state_dict(ckpt["schedule"])
        for k, v in ckpt["state"].items():
            setattr(self.state, k, v)
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    def resume(self) -> None:
        ckpt = self.run.load_checkpoint("last", map_location=self.device)
        refuse_other_data(ckpt, self.data, self.run.checkpoint_path("last"))
        try:
            self.load_state_dict(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            # A state file runs no code, but it can still be damaged or made for another run.
            raise UserError(f"{self.run.checkpoint_path('last')} does not fit this run "
                            f"({type(err).__name__}: {str(err)[:200]})") from None
        self.run.truncate_history(self.state.epoch)
        log.info("resumed %s at epoch %d, batch %d (step %d)", self.run.path,
                 self.state.epoch, self.state.batch, self.state.step)

    def save(self, name: str = "last") -> None:
        self.run.save_checkpoint(self.state_dict(), name)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the configured epoch count. Returns "done", "interrupted" or "stopped"."""
        t = self.config.train
        previous_handler = self._catch_sigint()
        try:
            while self.state.epoch < t.epochs:
                # Asked before every epoch, so a resumed run is refused before it overspends.
                reason = self.mode.stop_reason(len(self.batches) - self.state.batch)
                if reason:
                    log.info("stopping: %s", reason)
                    return "stopped"
                if not self._run_epoch():
                    self.save()
                    log.info("interrupted at epoch %d, batch %d; checkpoint saved. Continue with: "
                             "gankit train --resume %s", self.state.epoch + 1, self.state.batch,
                             self.run.path)
                    return "interrupted"
            return "done"
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            if self.recorder is not None:
                self.recorder.close()

    def _run_epoch(self) -> bool:
        """One epoch from the saved position. False when stopped by Ctrl-C."""
        t, s = self.config.train, self.state
        epoch = s.epoch
        bar = tqdm(self.batches.epoch(epoch, start=s.batch), total=len(self.batches),
                   initial=s.batch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch",
                   disable=None if t.progress else True, leave=False, dynamic_ncols=True)
        tick = time.perf_counter()
        for real, labels in bar:
            self._step(real, labels)
            if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                s.train_time += time.perf_counter() - tick
                tick = time.perf_counter()
                self.save()
            if self.stop_requested:
                s.train_time += time.perf_counter() - tick
                bar.close()
                return False
        bar.close()
        s.train_time += time.perf_counter() - tick
        self._end_epoch()
        return True

    def _step(self, real: Tensor, labels: Optional[Tensor]) -> None:
        """One discriminator step, and a generator step whenever the schedule says so."""
        t, s = self.config.train, self.state
        self._anneal_instance_noise()
        measure = (s.step + 1) % t.log_every == 0
        stats = self.d_step(self.ctx, self.D, self.d_opt, real, labels, measure)
        s.step += 1
        if self.schedule.d_step_done() and self.train_generator:
            # G's batch is the configured size, not the real batch's: under Poisson
            # sampling that size depends on the data. G needs no per-sample gradients of
            # D, so it goes through the plain network.
            stats.update(generator_step(self.ctx, unwrapped(self.D), self.g_opt, self.d_opt,
                                        t.batch_size, measure))
            self.schedule.g_step_done(float(stats["d_acc_g_fakes"]))
            s.g_steps += 1
            if self.ema is not None:
                self.ema.update_parameters(self.G)
        self._check_finite(stats)
        s.add(stats)
        s.batch += 1
        if measure:
            self._log_step(stats)
        for cb in self.callbacks:
            cb.on_step_end(self, stats)

    def train_steps(self, steps: int) -> dict:
        """Train `steps` discriminator steps from the current position, crossing epoch ends
        without any epoch-end work (no samples, history or checkpoints): a federated client's
        local round. Returns the mean statistics of these steps."""
        s = self.state
        s.sums, s.counts = {}, {}
        done = 0
        tick = time.perf_counter()
        while done < steps:
            for real, labels in self.batches.epoch(s.epoch, start=s.batch):
                self._step(real, labels)
                done += 1
                if done == steps:
                    break
            else:
                s.epoch, s.batch = s.epoch + 1, 0
        s.train_time += time.perf_counter() - tick
        return s.means()

    def _end_epoch(self) -> None:
        s = self.state
        # The learning rates this epoch trained with, read before the decay steps.
        lrs = {"lr_g": self.g_opt.param_groups[0]["lr"], "lr_d": self.d_opt.param_groups[0]["lr"]}
        for sch in self.schedulers:
            if sch is not None:
                sch.step()
        s.epoch += 1
        record = {"epoch": s.epoch, "step": s.step, "g_steps": s.g_steps, **s.means(), **lrs,
                  "d_steps_per_g_step": self.schedule.rate,
                  "train_time_s": round(s.train_time, 3), **self.mode.epoch_metrics()}
        grid = self.sample_grid() if self.recorder.grid_due(s.epoch) else None
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        s.batch, s.sums, s.counts = 0, {}, {}

        def save(name: str, best: Optional[float]) -> None:
            s.best = best  # in the checkpoint, so that a resumed run compares with it
            self.save(name)

        self.recorder.end(record, s.best, save, grid)

    def _anneal_instance_noise(self) -> None:
        noise = getattr(unwrapped(self.D), "noise", None)
        if noise is not None and self.config.model.instance_noise_anneal:
            total = self.config.train.epochs * len(self.batches)
            done = self.state.epoch * len(self.batches) + self.state.batch
            noise.std = self.config.model.instance_noise * max(0.0, 1.0 - done / total)

    def _check_finite(self, stats: dict) -> None:
        for key in ("d_loss", "g_loss"):
            if key in stats and not torch.isfinite(stats[key]):
                last = self.run.checkpoint_path("last") if self.run is not None else None
                kept = (f"the last good checkpoint is {last}" if last is not None and last.exists()
                        else "no checkpoint was written before this")
                raise TrainingDiverged(
                    f"{key} became {float(stats[key])} at epoch {self.state.epoch + 1}, step "
                    f"{self.state.step}; {kept}. Try lower learning rates or another loss.")

    # --- output -------------------------------------------------------------------------------
    def sample_grid(self) -> tuple[Tensor, int]:
        return sample_grid(self.sampling_generator, self.prior, self.num_classes,
                           self.config.train.seed + 1, self.device)

    def _log_step(self, stats: dict) -> None:
        writer = self.recorder.writer if self.recorder is not None else None
        if writer is not None:
            for k, v in stats.items():
                writer.add_scalar(f"step/{k}", float(v), self.state.step)

    def _catch_sigint(self):
        """First Ctrl-C: stop after the current step and save. Second: abort at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("Ctrl-C: saving a checkpoint after this step (press again to abort)")
        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside a Flower/Ray worker)
            return None


def generator_optimizer(G: nn.Module, prior: nn.Module, o) -> torch.optim.Optimizer:
    """G's Adam, which also trains a learnable prior (the mixture's means and scales)."""
    params = list(G.parameters()) + [p for p in prior.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=o.g_lr, betas=(o.g_beta1, o.g_beta2))


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available; "cuda" without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available())
                        else "cpu")


def unwrapped(module: nn.Module) -> nn.Module:
    """The plain network inside a wrapper (Opacus' GradSampleModule keeps it as `_module`)."""
    return getattr(module, "_module", module)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
