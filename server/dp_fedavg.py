"""Client-level DP-FedAvg with Poisson client sampling (McMahan et al. 2018), `--client-dp poisson`.

Each round every client joins independently with probability q = --fraction-train. The
server clips each joined client's update (its reply minus the round's global model) to L2
norm C over all its arrays, and releases

    global + (sum of clipped updates) / (q N) + N(0, (z C / (q N))^2)

to every float array: the fixed-denominator estimator, whose sensitivity to adding or
removing one client's whole data is C / (q N) whatever the round's sample. That is exactly
the subsampled Gaussian mechanism that Opacus' RDP accountant composes, once per round, so
the client-level epsilon gains amplification by sampling (toolkit/privacy.py:
client_level_epsilon with a sample rate). Flower's own DP wrappers sample a fixed number of
clients and account without amplification.

Privacy needs randomness nobody can replay: the sample and the noise come from the operating
system's entropy, never from the run's seed (which every client receives). A resumed run is
therefore not bit-exact, and a round in which nobody joined still releases its noise (to
skip it would reveal the sample). Integer buffers (BatchNorm's step counter) are not
released by the clients: they stay the global model's.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger("gankit")


class PoissonDPFedAvg(FedAvg):
    def __init__(self, clients: int, sample_rate: float, noise_multiplier: float, clipping_norm: float,
                 train_metrics_aggr_fn=None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        super().__init__(fraction_train=sample_rate, fraction_evaluate=0.0, min_train_nodes=0,
                         min_evaluate_nodes=0, min_available_nodes=clients,
                         train_metrics_aggr_fn=train_metrics_aggr_fn)
        self.clients, self.sample_rate = clients, sample_rate
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self.rng = np.random.default_rng()  # OS entropy: see the module docstring
        self.current: Optional[dict[str, np.ndarray]] = None

    def __repr__(self) -> str:
        return (f"PoissonDPFedAvg(q={self.sample_rate}, noise={self.noise_multiplier}, "
                f"clip={self.clipping_norm})")

    @property
    def denominator(self) -> float:
        return self.sample_rate * self.clients  # the expected number of joined clients

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.clients:
            raise RuntimeError(f"{len(nodes)} nodes are connected, the run has {self.clients} clients")
        joined = [node for node in nodes if self.rng.random() < self.sample_rate]
        self.current = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node) for node in joined]

    def clipped_update(self, reply: Message) -> dict[str, np.ndarray]:
        """A reply's update, scaled to L2 norm at most C over all its float arrays."""
        arrays = reply.content[self.arrayrecord_key]
        update = {k: arrays[k].numpy().astype(np.float64) - self.current[k]
                  for k in self.current if self.current[k].dtype.kind == "f"}
        norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update.values())))
        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        return {k: u * scale for k, u in update.items()}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = [r for r in replies if not r.has_error()]
        total = {k: np.zeros(v.shape, np.float64) for k, v in self.current.items() if v.dtype.kind == "f"}
        for reply in replies:
            for k, u in self.clipped_update(reply).items():
                total[k] += u
        std = self.noise_multiplier * self.clipping_norm / self.denominator
        released = {}
        for k, value in self.current.items():
            if k in total:
                noisy = total[k] / self.denominator + self.rng.normal(0.0, std, size=value.shape)
                released[k] = Array((value + noisy).astype(value.dtype))
            else:
                released[k] = Array(value)
        metrics = (self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
                   if replies else MetricRecord({"clients-replied": 0}))
        log.info("round %d: %d client(s) joined (expected %.3g); update noise std %.3g per coordinate",
                 server_round, len(replies), self.denominator, std)
        return ArrayRecord(released), metrics
