"""Training modes: what differs between standard, private and federated training.

The Trainer runs one loop and never asks which mode it is in. A mode may replace the
discriminator, its optimizer and the real-data batches when it is attached (the dp mode
wraps all three with Opacus), add metrics to each epoch's record (epsilon spent), stop a
run (budget spent), and keep state in checkpoints (the privacy accountant).
"""

from __future__ import annotations

from typing import Optional


class StandardMode:
    """Plain local training: nothing is wrapped."""

    name = "standard"

    def attach(self, trainer) -> None:
        pass

    def epoch_metrics(self) -> dict:
        return {}

    def stop_reason(self) -> Optional[str]:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


MODES = {"standard": StandardMode}


def build_mode(name: str):
    return MODES[name]()
