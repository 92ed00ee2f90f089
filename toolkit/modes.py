"""Training modes: what differs between standard, private and federated training.

The Trainer runs one loop and never asks which mode it is in. A mode may replace the
discriminator, its optimizer, the real-data batches and the discriminator step
(`trainer.d_step`, same signature as `toolkit.trainer.discriminator_step`) when it is
attached (the dp mode wraps all four: Opacus, Poisson batches, physical batches and only
private statistics), add metrics to each epoch's record (epsilon spent), refuse the next
epoch (budget spent; asked before every epoch), and keep state in checkpoints (the privacy
accountant).
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
        """Why the next epoch must not run, or None."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _private_mode():
    from toolkit.privacy import PrivateMode  # late: the only module that imports opacus

    return PrivateMode()


MODES = {"standard": StandardMode, "dp": _private_mode}


def build_mode(name: str):
    if name == "federated":
        # Many Trainers, one per client and round, under Flower: server/ and clients/.
        from toolkit.errors import UserError

        raise UserError("the federated mode is not a single training loop: run it with "
                        "`gankit train --mode federated` (server/simulation.py)")
    return MODES[name]()
