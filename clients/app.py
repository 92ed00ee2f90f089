"""The Flower ClientApp: one client's local GAN training on its share of the data.

Each train message carries the global weights (one ArrayRecord: G, D and the prior, keys
prefixed "g.", "d.", "p.") and, in its ConfigRecord, the whole run configuration as JSON,
so a client needs nothing but its node config: `partition-id`, `num-partitions` and,
optionally, `data-root` (where this machine keeps its data). It loads the data once per
process, takes its partition (seeded, so every machine agrees on the split), trains
`local_steps` discriminator steps with the toolkit's loop (toolkit/federated.py) and
returns both networks with metrics (examples, losses).

The server sends, in the train config, the partition it expects this node to hold ("client",
learnt from this node's answer to a query message, `identify`); the client refuses a round
meant for another partition. Sample-level DP: the server also decides each client's noise
multiplier and private steps; the client trains with exactly these and reports them back.

With --sync d the message's "arrays" hold D alone, which is all the client sends back
(clipped and noised alone under client-level DP); G and the prior come in "generator".

Client-level DP with clipping on the clients: when the server's config holds
"clipping_norm", Flower's `fixedclipping_mod` clips this client's update before it leaves.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from gankit.config import Config
from gankit.data import load_data
from gankit.errors import ConfigError
from gankit.federated import local_round
from gankit.statefile import StateFileError, from_parts, to_parts

_data_cache: dict = {}


def load_client_data(config: Config):
    key = json.dumps(config.to_dict()["data"], sort_keys=True)
    if key not in _data_cache:
        _data_cache.clear()
        _data_cache[key] = load_data(config.data)
    return _data_cache[key]


def run_config_of(msg: Message, context: Context) -> Config:
    raw = json.loads(str(msg.content["config"]["config-json"]))
    config = Config.from_dict(raw)
    if "data-root" in context.node_config:
        config = config.updated({"data_root": str(context.node_config["data-root"])})
    return config


def local_training(msg: Message, context: Context) -> Message:
    config = run_config_of(msg, context)
    client = int(context.node_config["partition-id"])
    if int(context.node_config.get("num-partitions", config.federated.clients)) != config.federated.clients:
        raise ConfigError(f"this node is one of {context.node_config['num-partitions']} partitions, but "
                          f"the run has {config.federated.clients} clients")
    torch.set_num_threads(max(1, int(config.federated.client_cpus)))
    cfg = msg.content["config"]
    if "client" in cfg and int(cfg["client"]) != client:
        raise ConfigError(f"the server sent this node a round for partition {cfg['client']}, but it "
                          f"holds partition {client}")
    noise, steps = None, None
    if config.federated.sample_dp:
        noise, steps = float(cfg["noise-multiplier"]), int(cfg["dp-steps"])
    carry = kept_state(context) if config.federated.client_optimizer == "keep" else None
    received = msg.content["arrays"].to_torch_state_dict()
    if "generator" in msg.content:  # --sync d: G and the prior come apart from D, to use only
        received.update(msg.content["generator"].to_torch_state_dict())
    weights, metrics = local_round(config, load_client_data(config), received,
                                   client, int(cfg["server-round"]),
                                   proximal_mu=float(cfg.get("proximal-mu", 0.0)),
                                   noise_multiplier=noise, steps=steps, carry=carry)
    if carry is not None:
        keep_state(context, carry)
    return Message(content=RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def kept_state(context: Context) -> dict:
    """What this node kept from its previous round of the run (its optimizers' states), or
    nothing. Flower keeps `context.state` per node and run, in simulation and deployment."""
    if KEPT_JSON not in context.state:
        return {}
    try:
        return from_parts(str(context.state[KEPT_JSON][KEPT_JSON]),
                          context.state[KEPT_TENSORS].to_torch_state_dict(), "the kept client state")
    except StateFileError:
        return {}


def keep_state(context: Context, carry: dict) -> None:
    text, tensors = to_parts(carry)
    context.state[KEPT_JSON] = ConfigRecord({KEPT_JSON: text})
    context.state[KEPT_TENSORS] = ArrayRecord(tensors)


KEPT_JSON, KEPT_TENSORS = "kept-state", "kept-tensors"

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which partition this node holds (the server asks once per run, before its first round)."""
    facts = {"partition-id": int(context.node_config["partition-id"])}
    if "num-partitions" in context.node_config:
        facts["num-partitions"] = int(context.node_config["num-partitions"])
    return Message(RecordDict({"node": MetricRecord(facts)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "clipping_norm" in msg.content["config"]:
        return fixedclipping_mod(msg, context, local_training)
    return local_training(msg, context)
