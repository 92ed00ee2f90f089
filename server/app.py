"""The Flower ServerApp: rounds of federated GAN training around one global model.

`serve` is the whole server: it sends the global weights and the run's configuration to the
sampled clients, aggregates the replies its guard accepts with the chosen strategy
(server/strategy.py), and after every round evaluates the global G centrally on the reference split, writes a
sample grid, the round's history record and checkpoints (toolkit/federated.py). A resumed
run starts from the last round's checkpoint and numbers rounds on from there.

Two ways in:
- simulation (server/simulation.py, `gankit train --mode federated`) builds a ServerApp
  around `serve` with the config and run folder in hand;
- deployment (`flwr run` against a SuperLink): the module attribute `app` below reads
  the run config keys `config` (a config JSON file), `out-dir`/`name` overrides and
  `resume` (true to continue the run folder).

A round whose global model is not finite raises TrainingDiverged before its history record
or checkpoint is written (gankit.federated.GlobalModel.end_round); it ends the simulation
(the CLI's exit code 3) or the deployed ServerApp (Flower marks the run failed).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from gankit.server.strategy import build_strategy, load_strategy_state, sampled_clients, strategy_state
from gankit.config import Config, validate
from gankit.data import ImageData, load_data
from gankit.errors import TrainingDiverged
from gankit.evaluate import training_classifier
from gankit.federated import (GlobalModel, client_partitions, describe_partitions, describe_sample_dp,
                               sample_dp_plan, statistics_keys)
from gankit.runs import RunDir

log = logging.getLogger("gankit")


def client_facing_config(config: Config) -> Config:
    """What clients receive: the data root made absolute (a simulated client's working
    folder may differ; a deployed client can override it with its node config)."""
    root = Path(config.data.data_root)
    return config.updated({"data_root": str(root.resolve())}) if root.exists() else config


def privacy_record(config: Config, rounds_done: int, data: ImageData) -> dict:
    f = config.federated
    if f.client_dp == "none":
        return {}
    # late: toolkit/privacy.py imports Opacus, which only client-level DP needs
    from gankit.privacy import client_level_epsilon, resolve_delta

    delta = resolve_delta(config.privacy.delta, f.clients)
    q = f.fraction_train if f.client_dp == "poisson" else 1.0
    return {"client_epsilon": client_level_epsilon(f.client_dp_noise, rounds_done, delta, q),
            "client_delta": delta, "client_dp_noise": f.client_dp_noise,
            "client_dp_clip": f.client_dp_clip}


class RoundsStopped(Exception):
    """Raised at a round's end, after its checkpoint, when a stop was asked for (Ctrl-C)."""


def serve(grid: Grid, config: Config, run: RunDir, data: ImageData, resume: bool = False,
          classifier=None, stop=None) -> GlobalModel:
    """Run the remaining rounds. `stop` (a threading.Event) ends the run at the next round's
    end, after that round's checkpoint, by raising RoundsStopped."""
    f = config.federated
    model = GlobalModel(config, data, run, classifier)
    if resume:
        model.resume()
    describe_partitions(config, data, run)
    plan = sample_dp_plan(config, data) if f.sample_dp else None
    if plan is not None:
        describe_sample_dp(config, plan)
    remaining = f.rounds - model.round
    if remaining <= 0:
        log.info("all %d rounds are done", f.rounds)
        return model
    offset = model.round
    strategy = build_strategy(config, ArrayRecord(model.weights),
                              [len(indices) for indices in client_partitions(config, data)], offset, plan,
                              train_generator=model.train_generator,
                              statistics_keys=statistics_keys(model.G, model.D, model.prior))
    load_strategy_state(strategy, model.server_state.get("strategy"))

    def end_of_round(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        if server_round == 0:
            return None  # Flower evaluates the initial weights first; the history has them as a run start
        outcome = strategy.outcome  # what the guard saw this round
        model.server_state["strategy"] = strategy_state(strategy)  # saved with the round's checkpoint
        extra = {"failed": len(outcome.failed), "dropped": len(outcome.dropped)}
        extra.update(privacy_record(config, server_round + offset, data))
        if f.sample_dp:
            # Every node the server sent the round is charged, from the server's own record.
            extra.update(model.account_sample_dp(list((outcome.sent or {}).values())))
        record = model.end_round(server_round + offset,
                                 arrays.to_torch_state_dict() if outcome.aggregated else None,
                                 outcome.metrics if outcome.aggregated else {}, extra)
        if stop is not None and stop.is_set():
            raise RoundsStopped(server_round + offset)
        return MetricRecord({k: float(v) for k, v in record.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})

    log.info("federated: %d clients (%d per round), %d rounds of %d local steps, %s%s", f.clients,
             sampled_clients(config), remaining, f.local_steps, f.strategy,
             f", client-level DP ({f.client_dp}-side clipping)" if f.client_dp != "none" else "")
    model.start_clock()
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.weights), num_rounds=remaining,
                       train_config=ConfigRecord({"config-json": json.dumps(client_facing_config(config).to_dict())}),
                       evaluate_fn=end_of_round)
    finally:
        model.recorder.close()
    return model


# --- deployment: `flwr run` ------------------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if "config" not in rc:
        raise SystemExit("the server app needs a run config 'config' (a gankit config JSON file)")
    config = Config.load(Path(str(rc["config"])))
    overrides = {k.replace("-", "_"): rc[k] for k in ("out-dir", "name", "rounds") if k in rc}
    config = config.updated({"mode": "federated", **overrides})
    data = load_data(config.data)
    validate(config, data.num_classes)
    resume = bool(rc.get("resume", False))
    run = RunDir.open(Path(config.train.out_dir) / config.train.name) if resume else RunDir.create(config)
    # The round lines, dropped replies and a divergence go to Flower's log stream (this process's
    # stdout, which `flwr run --stream` and `flwr log` show) and to the run folder's log, as a
    # CLI run's do.
    handlers, level = [logging.StreamHandler(sys.stdout), logging.FileHandler(run.log_path)], log.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        serve(grid, config, run, data, resume=resume, classifier=training_classifier(config, data))
    except TrainingDiverged as err:
        # Raised on to Flower, which marks the run failed with this text; the run folder keeps
        # the last good round's checkpoint.
        log.error("training diverged: %s", err)
        raise
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
