"""Training modes: what differs between standard, private and federated training.

The Trainer runs one loop and never asks which mode it is in. A mode prepares the parts
it changes and returns them, as Opacus' `make_private` does: `prepare(parts, config)`
takes the discriminator, its optimizer, the real-data batches and the D step
(`DiscriminatorParts`) and returns the parts the loop should use (the dp mode: a
per-sample-gradient D, a clipping and noising optimizer, Poisson batches and a D step that
splits physical batches and keeps only private statistics). A mode also adds metrics to
each epoch's record (epsilon spent), may refuse the rest of an epoch (budget spent; asked
before every epoch with the steps it would take), and keeps state in checkpoints (the
privacy accountant).

This module holds the interface and the standard mode; the dp mode is `PrivateMode` in
toolkit/privacy.py, and the Trainer picks one by name (`build_mode` in toolkit/trainer.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol

import torch
from torch import nn


class DiscriminatorParts(NamedTuple):
    D: nn.Module
    optimizer: torch.optim.Optimizer
    batches: object          # .epoch(epoch, start) -> iterator of (real, labels); len() = steps
    step: Callable           # (StepContext, D, optimizer, real, labels, measure) -> stats


class Mode(Protocol):
    name: str

    def prepare(self, parts: DiscriminatorParts, config) -> DiscriminatorParts: ...

    def epoch_metrics(self) -> dict: ...

    def stop_reason(self, steps_ahead: int) -> Optional[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StandardMode:
    """Plain local training: nothing is wrapped."""

    name = "standard"

    def prepare(self, parts: DiscriminatorParts, config) -> DiscriminatorParts:
        return parts

    def epoch_metrics(self) -> dict:
        return {}

    def stop_reason(self, steps_ahead: int) -> Optional[str]:
        """Why the next `steps_ahead` steps must not run, or None."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
