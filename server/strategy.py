"""The server's aggregation: a Flower strategy chosen by --strategy, guarded.

    fedavg, fedprox, fedadam        (FedProx's proximal term is applied by the clients)
    fedmedian, trimmed-mean, krum   robust to a minority of bad clients
    --client-dp server|client       Flower's DP-FedAvg wrappers (fixed clipping) around
                                    fedavg/fedprox; the server reports epsilon

Every strategy is wrapped by `guarded`, which
- drops replies that failed (a client raised or vanished) and replies whose weights are not
  finite (NaN or inf from a broken or malicious client): no strategy averages NaN;
- keeps the previous global model when fewer than --min-clients good replies are left;
- numbers rounds from where a resumed run left off, so clients see the true round (their
  batch order is seeded by it).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategies

from toolkit.config import Config

log = logging.getLogger("toolkit")


def sampled_clients(config: Config) -> int:
    """How many clients Flower samples each round (it takes max(int(N * fraction), minimum))."""
    f = config.federated
    return max(1, int(f.clients * f.fraction_train))


def finite(reply: Message) -> bool:
    return all(np.isfinite(a).all() for a in reply.content["arrays"].to_numpy_ndarrays())


def guarded(strategy_cls: type, round_offset: int, min_replies: int, outcome: dict) -> type:
    """strategy_cls with failed and non-finite replies dropped, a minimum of good replies,
    rounds shifted by round_offset; `outcome` receives what each round did."""

    class Guarded(strategy_cls):
        def configure_train(self, server_round, arrays, config, grid):
            return super().configure_train(server_round + round_offset, arrays, config, grid)

        def aggregate_train(self, server_round, replies: Iterable[Message]):
            replies = list(replies)
            failed = [m for m in replies if m.has_error()]
            answered = [m for m in replies if not m.has_error()]
            good = [m for m in answered if finite(m)]
            outcome.update(failed=len(failed), rejected=len(answered) - len(good), replied=len(good),
                           client_metrics=[dict(next(iter(m.content.metric_records.values())))
                                           for m in answered if m.content.metric_records])
            if failed:
                log.warning("round %d: %d client(s) failed: %s", server_round + round_offset, len(failed),
                            "; ".join(m.error.reason.strip().splitlines()[-1][:200] for m in failed))
            if len(good) < len(answered):
                log.warning("round %d: rejected %d reply(ies) with non-finite weights",
                            server_round + round_offset, len(answered) - len(good))
            if len(good) < min_replies:
                outcome["aggregated"] = False
                log.warning("round %d: %d good replies, fewer than --min-clients %d: the global model "
                            "stays as it was", server_round + round_offset, len(good), min_replies)
                return None, None
            arrays, metrics = super().aggregate_train(server_round + round_offset, good)
            outcome["aggregated"] = arrays is not None
            return arrays, metrics

    Guarded.__name__ = f"Guarded{strategy_cls.__name__}"
    return Guarded


PER_CLIENT_FACTS = ("client", "noise-multiplier", "sample-rate", "dp-steps", "delta")


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the clients' numeric metrics (losses, epsilon: the max)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(m[weight_key]) for m in metrics])
    out = {"clients-replied": len(metrics), weight_key: int(weights.sum())}
    # Per-client facts are not averaged: the sample-level privacy account uses each one
    # (toolkit/federated.py: GlobalModel.account_sample_dp).
    keys = set.intersection(*(set(m.keys()) for m in metrics)) - {weight_key, *PER_CLIENT_FACTS}
    for key in sorted(keys):
        values = np.array([float(m[key]) for m in metrics])
        out[key] = float(values.max() if key == "epsilon" else (values * weights).sum() / weights.sum())
    return MetricRecord(out)


# Beyond the global weights, the FedOpt family (FedAdam) carries the server optimizer's
# moments from round to round; a resumed run must continue them, not restart from zero.
SERVER_OPTIMIZER_STATE = ("m_t", "v_t")


def strategy_state(strategy) -> dict:
    """The strategy's state between rounds (as tensors, for the checkpoint)."""
    return {name: {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, name).items()}
            for name in SERVER_OPTIMIZER_STATE if getattr(strategy, name, None)}


def load_strategy_state(strategy, state: dict) -> None:
    for name, arrays in (state or {}).items():
        setattr(strategy, name, {k: v.numpy() for k, v in arrays.items()})


def build_strategy(config: Config, round_offset: int, outcome: dict,
                   train_metrics: Callable = weighted_metrics):
    f = config.federated
    sampled = sampled_clients(config)
    common = dict(fraction_train=f.fraction_train, fraction_evaluate=0.0, min_train_nodes=sampled,
                  min_evaluate_nodes=0, min_available_nodes=f.clients, train_metrics_aggr_fn=train_metrics)
    base = {"fedavg": (flwr_strategies.FedAvg, {}),
            "fedprox": (flwr_strategies.FedProx, {"proximal_mu": f.proximal_mu}),
            "fedadam": (flwr_strategies.FedAdam, {"eta": f.server_lr}),
            "fedmedian": (flwr_strategies.FedMedian, {}),
            "trimmed-mean": (flwr_strategies.FedTrimmedAvg, {"beta": f.trim_fraction}),
            "krum": (flwr_strategies.Krum, {"num_malicious_nodes": f.krum_malicious})}
    cls, extra = base[f.strategy]
    min_replies = max(1, f.min_clients)
    if f.client_dp == "none":
        return guarded(cls, round_offset, min_replies, outcome)(**common, **extra)
    wrapper = {"server": flwr_strategies.DifferentialPrivacyServerSideFixedClipping,
               "client": flwr_strategies.DifferentialPrivacyClientSideFixedClipping}[f.client_dp]
    # The DP wrapper clips and noises the replies it is handed, so the guard goes outside it.
    return guarded(wrapper, round_offset, min_replies, outcome)(
        cls(**common, **extra), noise_multiplier=f.client_dp_noise, clipping_norm=f.client_dp_clip,
        num_sampled_clients=sampled)
