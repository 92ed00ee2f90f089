"""How many discriminator steps come before each generator step.

`fixed`: every n_critic-th D step is followed by a G step.

`adaptive` (Bie et al. 2023, "Private GANs, revisited"): n_D starts at n_critic and climbs
the ladder 1, 2, 5, 10, 20, 50, 100, ... whenever a moving average of D's accuracy on
fresh fakes falls to a threshold. Under DP noise D needs more and more steps to keep up
with G; when it can no longer tell G's samples apart, more D steps per G step restore the
signal. A climb needs `grace` G steps at the current rung first (so the average reflects
the new rate). The accuracy is read from the scores of the fakes that the G step is about
to train on (generated just now, never seen by D): a function of D and G alone, so it is
post-processing of the private D and costs no privacy.
"""

from __future__ import annotations

from typing import Optional

LADDER = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SCHEDULES = ("fixed", "adaptive")


class DStepSchedule:
    def __init__(self, kind: str, start: int, threshold: float = 0.6, grace: int = 200,
                 beta: float = 0.99):
        self.kind, self.threshold, self.grace, self.beta = kind, threshold, grace, beta
        self.rate = start
        self.since_g = 0            # D steps since the last G step
        self.g_at_rate = 0          # G steps taken at the current rate
        self.fake_accuracy: Optional[float] = None  # the moving average

    def d_step_done(self) -> bool:
        """Count one D step; True when a G step is due now."""
        self.since_g += 1
        return self.since_g >= self.rate

    def g_step_done(self, fake_accuracy: float) -> None:
        """Record the G step and D's accuracy on its fresh fakes; maybe climb the ladder."""
        self.since_g = 0
        self.g_at_rate += 1
        avg = self.fake_accuracy
        self.fake_accuracy = (fake_accuracy if avg is None
                              else self.beta * avg + (1 - self.beta) * fake_accuracy)
        if (self.kind == "adaptive" and self.g_at_rate >= self.grace
                and self.fake_accuracy <= self.threshold):
            self.rate = next((r for r in LADDER if r > self.rate), self.rate)
            self.g_at_rate = 0

    def state_dict(self) -> dict:
        return {"rate": self.rate, "since_g": self.since_g, "g_at_rate": self.g_at_rate,
                "fake_accuracy": self.fake_accuracy}

    def load_state_dict(self, state: dict) -> None:
        self.rate = int(state["rate"])
        self.since_g = int(state["since_g"])
        self.g_at_rate = int(state["g_at_rate"])
        acc = state["fake_accuracy"]
        self.fake_accuracy = None if acc is None else float(acc)
