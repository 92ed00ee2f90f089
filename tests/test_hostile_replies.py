"""Hostile client replies: the server's guard (server/strategy.py: ReplyGuard) drops every
malformed, forged, huge or late reply with a count and a reason, aggregates the honest ones
exactly as if the others had not replied, and keeps the sample-level privacy account from what
the server sent. The guard is called directly with Flower messages, in seconds.

A global model that stops being finite anyway (an overflowing aggregate) stops the run like a
diverged standard run: no record or checkpoint of that round, TrainingDiverged out of the inline
and Ray simulations and the deployed ServerApp, exit code 3 from the CLI (one Ray run, ~25 s)."""

from typing import Optional

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from conftest import synthetic_data, tiny_config  # noqa: E402
from gankit.server.strategy import MAX_STEP, build_strategy  # noqa: E402
from gankit.federated import GlobalModel, sample_dp_plan  # noqa: E402
from gankit.privacy import epsilon_of  # noqa: E402
from gankit.runs import RunDir  # noqa: E402

# Outside a running federation a Message needs a task identity.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

# A small global model with what the real one has: float tensors and an integer scalar
# (BatchNorm's num_batches_tracked).
GLOBAL = {"w": np.zeros(4, np.float32), "b": np.zeros((2, 3), np.float32), "count": np.array(0, np.int64)}
SIZES = [40, 50, 60, 70]  # the partitions the server planned


def records(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in arrays.items()})


def npy_bytes(value: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)  # what a hostile client may send; the server never unpickles
    return buffer.getvalue()


GARBAGE = Array(dtype="<f4", shape=(4,), stype="numpy.ndarray", data=b"not an array")
PICKLED = Array(dtype="|O", shape=(4,), stype="numpy.ndarray",
                data=npy_bytes(np.array([{}, {}, {}, {}], dtype=object)))


class FakeGrid:
    """What the strategies ask of Flower's Grid: the connected nodes and, under sample-level
    DP, their answers to the partition query (None: the node answers with an error)."""

    def __init__(self, partition_of_node: dict[int, Optional[int]], partitions: int):
        self.partition_of_node, self.partitions = partition_of_node, partitions
        self.queried: list[int] = []

    def get_node_ids(self):
        return list(self.partition_of_node)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error

        replies = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            node = m.metadata.dst_node_id
            self.queried.append(node)
            partition = self.partition_of_node[node]
            if partition is None:
                replies.append(Message(Error(code=0, reason="node offline"), reply_to=m))
            else:
                facts = {"partition-id": partition, "num-partitions": self.partitions}
                replies.append(Message(RecordDict({"node": MetricRecord(facts)}), reply_to=m))
        return replies


def config_of(tmp_path, **overrides):
    return tiny_config(tmp_path, **{"mode": "federated", "clients": 4, "local_steps": 5, **overrides})


def start_round(guard, grid, server_round=1) -> dict[int, Message]:
    """configure_train as Strategy.start calls it: the messages sent, by node."""
    sent = guard.configure_train(server_round, records(GLOBAL), ConfigRecord({"config-json": "{}"}), grid)
    return {m.metadata.dst_node_id: m for m in sent}


def honest_arrays(i: int) -> dict:
    return {"w": np.full(4, i + 1.0, np.float32), "b": np.full((2, 3), -(i + 1.0), np.float32),
            "count": np.array(10 + i, np.int64)}


def honest_metrics(config, message: Message, client: int, examples: Optional[int] = None) -> dict:
    sent = message.content["config"]
    metrics = {"num-examples": SIZES[client] if examples is None else examples, "client": client,
               "local-steps": config.federated.local_steps, "d_loss": 1.0, "g_loss": 0.5}
    for key in ("client", "num-examples", "noise-multiplier", "sample-rate", "dp-steps", "delta"):
        if key in sent:  # sample-level DP: the client did what it was sent
            metrics[key] = sent[key]
    if "noise-multiplier" in sent:
        metrics.pop("d_loss")  # the dp mode drops the losses that read the real batch
        metrics["epsilon"] = 1.0
    return metrics


def reply(message: Message, arrays: dict, metrics: dict, **extra_records) -> Message:
    return Message(RecordDict({"arrays": records(arrays), "metrics": MetricRecord(metrics), **extra_records}),
                   reply_to=message)


def aggregate_of(guard, replies) -> dict:
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# Each hostile reply: (what it does to an honest reply, words of the reason it is dropped for).
HOSTILE = {
    "extra key": (lambda a, m: ({**a, "z": np.zeros(1, np.float32)}, m), "not in the model"),
    "missing key": (lambda a, m: ({k: v for k, v in a.items() if k != "b"}, m), "missing"),
    "wrong shape": (lambda a, m: ({**a, "w": np.full(5, 1e6, np.float32)}, m), "shape"),
    "wrong dtype": (lambda a, m: ({**a, "w": np.full(4, 1e6, np.float64)}, m), "dtype"),
    "scalar for a tensor": (lambda a, m: ({**a, "b": np.array(1e6, np.float32)}, m), "shape"),
    "garbage bytes": (lambda a, m: ({**a, "w": GARBAGE}, m), "cannot be read"),
    "a pickled object array": (lambda a, m: ({**a, "w": PICKLED}, m), "cannot be read"),
    "NaN": (lambda a, m: ({**a, "w": np.array([0, np.nan, 0, 0], np.float32)}, m), "not finite"),
    "infinite": (lambda a, m: ({**a, "b": np.full((2, 3), np.inf, np.float32)}, m), "not finite"),
    "num-examples 1e9": (lambda a, m: ({**a, "w": np.full(4, 100, np.float32)}, {**m, "num-examples": 10 ** 9}),
                         "outside"),
    "num-examples 1e9 as a float": (lambda a, m: (a, {**m, "num-examples": 1e9}), "not an integer"),
    "negative num-examples": (lambda a, m: (a, {**m, "num-examples": -5}), "outside"),
    "missing metric": (lambda a, m: (a, {k: v for k, v in m.items() if k != "client"}), "missing"),
    "unexpected metric": (lambda a, m: (a, {**m, "weight": 1e9}), "unexpected"),
    "metric of the wrong type": (lambda a, m: (a, {**m, "g_loss": [0.5, 0.5]}), "not a number"),
    "NaN metric": (lambda a, m: (a, {**m, "d_loss": float("nan")}), "not finite"),
    "client id out of range": (lambda a, m: (a, {**m, "client": 99}), "outside"),
    "another node's partition": (lambda a, m: (a, {**m, "client": 0}), "server sent"),
    "huge but finite": (lambda a, m: ({**a, "w": np.full(4, 1e30, np.float32), "b": np.full((2, 3), 1e30, np.float32)},
                                      m), "moves"),
    "just past MAX_STEP": (lambda a, m: ({**a, "w": np.full(4, MAX_STEP * 1.01, np.float32)}, m), "moves"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_is_dropped_and_the_honest_replies_make_the_round(tmp_path, case):
    config = config_of(tmp_path)
    make_hostile, reason = HOSTILE[case]

    def round_of(hostile: bool):
        guard = build_strategy(config, records(GLOBAL), SIZES)
        sent = start_round(guard, FakeGrid({101: 0, 102: 1, 103: 2, 104: 3}, 4))
        replies = [reply(sent[101 + i], honest_arrays(i), honest_metrics(config, sent[101 + i], i))
                   for i in range(3)]
        if hostile:  # node 104 sends 100 where it can (within MAX_STEP), so that taking it in would show
            arrays, metrics = make_hostile({k: np.full_like(v, 100) for k, v in GLOBAL.items()},
                                           honest_metrics(config, sent[104], 3))
            replies.insert(1, reply(sent[104], arrays, metrics))
        return guard, aggregate_of(guard, replies)

    guard, aggregate = round_of(hostile=True)
    o = guard.outcome
    assert (o.received, o.accepted, len(o.dropped), o.failed, o.aggregated) == (4, 3, 1, [], True)
    node, why = o.dropped[0]
    assert node == 104 and reason in why, why
    _, honest_only = round_of(hostile=False)
    assert_same(aggregate, honest_only)
    # Equal weights over the honest three, in the global model's dtypes (the mean count 11 is an int).
    assert_same(aggregate, {"w": np.full(4, 2.0, np.float32), "b": np.full((2, 3), -2.0, np.float32),
                            "count": np.array(11, np.int64)})


def test_structural_forgeries_are_dropped_too(tmp_path):
    config = config_of(tmp_path)
    guard = build_strategy(config, records(GLOBAL), SIZES)
    grid = FakeGrid({101: 0, 102: 1, 103: 2, 104: 3}, 4)
    sent = start_round(guard, grid)
    honest = [reply(sent[101 + i], honest_arrays(i), honest_metrics(config, sent[101 + i], i)) for i in range(2)]
    extra_record = reply(sent[103], honest_arrays(2), honest_metrics(config, sent[103], 2),
                         notes=ConfigRecord({"x": 1}))
    # A second reply from a node that already answered, and one from a node no message went to.
    twice = reply(sent[101], honest_arrays(3), honest_metrics(config, sent[101], 0))
    elsewhere = Message(RecordDict(), dst_node_id=999, message_type=MessageType.TRAIN)
    stranger = reply(elsewhere, honest_arrays(3), honest_metrics(config, sent[104], 3))
    aggregate = aggregate_of(guard, honest + [extra_record, twice, stranger])
    reasons = dict(guard.outcome.dropped)
    assert sorted(reasons) == [101, 103, 999]
    assert "records" in reasons[103] and "second reply" in reasons[101] and "not sent" in reasons[999]
    assert guard.outcome.accepted == 2 and np.array_equal(aggregate["w"], np.full(4, 1.5, np.float32))


def test_every_reply_weighs_the_same_whatever_example_count_it_claims(tmp_path):
    config = config_of(tmp_path, clients=3)
    guard = build_strategy(config, records(GLOBAL), SIZES[:3])
    sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2}, 3))
    # Plausible but unequal claims (1, 40, 60 examples): the mean is still the plain mean.
    replies = [reply(sent[node], honest_arrays(i), {**honest_metrics(config, sent[node], i), "num-examples": n})
               for i, (node, n) in enumerate(((1, 1), (2, 40), (3, 60)))]
    aggregate = aggregate_of(guard, replies)
    assert np.array_equal(aggregate["w"], np.full(4, 2.0, np.float32))
    assert guard.outcome.metrics["clients-replied"] == 3 and "num-examples" not in guard.outcome.metrics


def test_honest_replies_with_different_optional_statistics_still_make_a_round(tmp_path):
    config = config_of(tmp_path, clients=3)
    guard = build_strategy(config, records(GLOBAL), SIZES[:3])
    sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2}, 3))
    metrics = [honest_metrics(config, sent[node], node - 1) for node in (1, 2, 3)]
    metrics[1].pop("g_loss")  # this client's round had no G step
    metrics[2]["d_loss"] = 4.0
    aggregate = aggregate_of(guard, [reply(sent[n], honest_arrays(n - 1), m) for n, m in zip((1, 2, 3), metrics)])
    assert np.array_equal(aggregate["w"], np.full(4, 2.0, np.float32))
    assert guard.outcome.metrics == {"clients-replied": 3, "local-steps": 5.0, "d_loss": 2.0}


def test_failed_replies_and_too_few_good_ones_keep_the_model_without_ending_the_run(tmp_path):
    from flwr.app import Error

    config = config_of(tmp_path, clients=3, min_clients=2)
    guard = build_strategy(config, records(GLOBAL), SIZES[:3])
    sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2}, 3))
    replies = [reply(sent[1], honest_arrays(0), honest_metrics(config, sent[1], 0)),
               Message(Error(code=1, reason="Traceback ...\nRuntimeError: lost its connection"), reply_to=sent[2]),
               reply(sent[3], {**honest_arrays(2), "w": np.full(4, np.inf, np.float32)},
                     honest_metrics(config, sent[3], 2))]
    assert guard.aggregate_train(1, replies) == (None, None)
    o = guard.outcome
    assert o.failed == [(2, "RuntimeError: lost its connection")] and len(o.dropped) == 1
    assert (o.accepted, o.aggregated) == (1, False)


STRATEGIES = [dict(strategy=s) for s in ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean", "krum")] + \
             [dict(strategy="fedavgm", server_step=2.0, server_momentum=0.5),
              dict(strategy="fedavg", client_dp="server"),
              # Under client-side clipping the guard drops updates longer than C: the honest
              # replies here (norms up to 3 sqrt(10)) are taken as clipped to 10.
              dict(strategy="fedavg", client_dp="client", client_dp_clip=10.0)]


@pytest.mark.parametrize("options", STRATEGIES, ids=lambda o: "+".join(map(str, o.values())))
def test_every_strategy_survives_a_round_of_all_hostile_kinds_at_once(tmp_path, options):
    hostile = sorted(HOSTILE)
    n = 3 + len(hostile)
    config = config_of(tmp_path, clients=n, **options)
    nodes = {100 + i: i for i in range(n)}
    sizes = [40] * n

    def round_of(with_hostile: bool):
        guard = build_strategy(config, records(GLOBAL), sizes)
        sent = start_round(guard, FakeGrid(nodes, n))
        replies = [reply(sent[100 + i], honest_arrays(i), honest_metrics(config, sent[100 + i], i, 40))
                   for i in range(3)]
        for i, case in enumerate(hostile if with_hostile else [], start=3):
            arrays, metrics = HOSTILE[case][0]({k: np.full_like(v, 100) for k, v in GLOBAL.items()},
                                               honest_metrics(config, sent[100 + i], i, 40))
            replies.append(reply(sent[100 + i], arrays, metrics))
        np.random.seed(0)  # the DP wrappers' noise
        return guard, aggregate_of(guard, replies)

    guard, aggregate = round_of(True)
    assert len(guard.outcome.dropped) == len(hostile) and guard.outcome.accepted == 3
    assert_same(aggregate, round_of(False)[1])
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e5 for v in aggregate.values())


# --- sample-level DP: the server's account is its own -----------------------------------------

def sample_dp_setup(tmp_path, nodes: dict[int, Optional[int]], **overrides):
    config = config_of(tmp_path, name="sdp", sample_dp=True, noise_multiplier=1.1, batch_size=16,
                       partition="dirichlet", dirichlet_alpha=0.5, **overrides)
    data = synthetic_data(n=256)
    plan = sample_dp_plan(config, data)
    guard = build_strategy(config, records(GLOBAL), [c["num-examples"] for c in plan], sample_dp_plan=plan)
    return config, data, plan, guard, FakeGrid(nodes, config.federated.clients)


def one_round_epsilon(config, entry, rounds=1) -> float:
    p = config.privacy
    return epsilon_of([(entry["noise-multiplier"], entry["sample-rate"], entry["dp-steps"] * rounds)],
                      entry["delta"], p.accountant, p.poisson_sampling)


def test_sample_level_dp_the_server_sends_each_node_its_plan_and_drops_forged_claims(tmp_path):
    nodes = {11: 0, 12: 1, 13: 2, 14: 3}
    config, data, plan, guard, grid = sample_dp_setup(tmp_path, nodes)
    assert len({c["sample-rate"] for c in plan}) > 1  # unequal partitions: unequal sample rates
    sent = start_round(guard, grid)
    for node, message in sent.items():  # what the client is told to do
        cfg = message.content["config"]
        assert {k: cfg[k] for k in plan[0]} == plan[nodes[node]] and cfg["config-json"] == "{}"
        assert guard.outcome.sent[node] == plan[nodes[node]]
    replies = [reply(sent[node], honest_arrays(nodes[node]), honest_metrics(config, sent[node], nodes[node]))
               for node in (11, 12)]
    # Node 13 (partition 2) claims to be client 1; node 14 (partition 3) claims noise 1000.
    replies.append(reply(sent[13], honest_arrays(2), {**honest_metrics(config, sent[13], 2), "client": 1}))
    replies.append(reply(sent[14], honest_arrays(3), {**honest_metrics(config, sent[14], 3),
                                                      "noise-multiplier": 1000.0}))
    aggregate = aggregate_of(guard, replies)
    reasons = dict(guard.outcome.dropped)
    assert sorted(reasons) == [13, 14]
    assert "client" in reasons[13] and "noise-multiplier" in reasons[14] and "server sent" in reasons[14]
    assert np.array_equal(aggregate["w"], np.full(4, 1.5, np.float32))  # nodes 11 and 12 only

    run = RunDir.create(config)
    model = GlobalModel(config, data, run)
    record = model.end_round(1, None, {}, model.account_sample_dp(list(guard.outcome.sent.values())))
    eps = record["epsilon_per_client"]
    # Every partition sent the round is charged once, at its planned noise: the forged client id
    # did not charge partition 1 twice (nor spare partition 2), the forged noise spared nobody.
    assert set(eps) == {"0", "1", "2", "3"}
    for c in range(4):
        assert eps[str(c)] == pytest.approx(one_round_epsilon(config, plan[c]), abs=1e-4)
    assert record["epsilon"] == pytest.approx(max(eps.values()), abs=1e-4)
    # The account lives in the checkpoint: a resumed run continues it.
    again = GlobalModel(config, data, run)
    again.resume()
    assert again.account_sample_dp([])["epsilon_per_client"] == eps


def test_sample_level_dp_nodes_are_asked_their_partition_once_and_unplaceable_nodes_get_no_round(tmp_path):
    # Node 5 answers the query with an error, node 6 with a partition that does not exist;
    # node 7 claims node 3's partition.
    nodes = {3: 0, 4: 1, 5: None, 6: 9, 7: 0}
    config, data, plan, guard, grid = sample_dp_setup(tmp_path, nodes, clients=5)
    sent = start_round(guard, grid)
    # A second claimant of partition 0 is not sent rounds: its data must not count twice.
    assert sorted(sent) == [3, 4] and sorted(grid.queried) == [3, 4, 5, 6, 7]
    model = GlobalModel(config, data, RunDir(tmp_path))
    eps = model.account_sample_dp(list(guard.outcome.sent.values()))["epsilon_per_client"]
    assert set(eps) == {"0", "1"}
    assert eps["0"] == pytest.approx(one_round_epsilon(config, plan[0], rounds=1), abs=1e-4)
    start_round(guard, grid, server_round=2)
    # Known nodes and the duplicate are not asked again; the two that gave no usable answer are.
    assert sorted(grid.queried) == [3, 4, 5, 5, 6, 6, 7]


def test_sample_level_dp_the_client_trains_what_it_was_sent_and_refuses_another_partitions_round(tmp_path):
    import json

    from flwr.app import Context

    from gankit.clients.app import app, local_training
    from gankit.errors import ConfigError

    config, _, plan, _, _ = sample_dp_setup(tmp_path, {})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    query = Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=7,
                    message_type=MessageType.QUERY)
    answer = app(query, context)
    assert dict(answer.content["node"]) == {"partition-id": 1, "num-partitions": 4}
    train = Message(RecordDict({"arrays": records(GLOBAL), "config": ConfigRecord(
        {"config-json": json.dumps(config.to_dict()), "server-round": 1, **plan[0]})}),
        dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(ConfigError, match="partition 0"):
        local_training(train, context)


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path):
    # Ray hands replies over as they finish; float sums in another order differ in the last bits.
    config = config_of(tmp_path, clients=3, strategy="fedavgm")
    rng = np.random.default_rng(5)
    values = {i: {"w": rng.normal(size=4).astype(np.float32) * 10 ** (3 * i),
                  "b": rng.normal(size=(2, 3)).astype(np.float32), "count": np.array(10 + i, np.int64)}
              for i in range(3)}
    aggregates = []
    for order in ((1, 2, 3), (3, 1, 2), (2, 3, 1)):
        guard = build_strategy(config, records(GLOBAL), SIZES[:3])
        sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2}, 3))
        aggregates.append(aggregate_of(guard, [reply(sent[n], values[n - 1], honest_metrics(config, sent[n], n - 1))
                                               for n in order]))
    assert_same(aggregates[0], aggregates[1])
    assert_same(aggregates[0], aggregates[2])


def test_under_server_side_clipping_a_reply_without_an_update_is_dropped_not_a_crash(tmp_path):
    # Flower's server-side clipping divides by the update's norm: the model sent back unchanged
    # (or changed by less than its float32 squares can hold) raised ZeroDivisionError and ended
    # the run.
    config = config_of(tmp_path, clients=4, client_dp="server", client_dp_clip=1.0)
    guard = build_strategy(config, records(GLOBAL), SIZES)
    sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, 4))
    unchanged = {**GLOBAL, "count": np.array(7, np.int64)}  # a counter moved, no weight did
    tiny = {**GLOBAL, "w": np.array([1e-20, 0, 0, 0], np.float32)}
    replies = [reply(sent[n], honest_arrays(n - 1), honest_metrics(config, sent[n], n - 1)) for n in (1, 2)]
    replies += [reply(sent[3], unchanged, honest_metrics(config, sent[3], 2)),
                reply(sent[4], tiny, honest_metrics(config, sent[4], 3))]
    np.random.seed(0)
    arrays, _ = guard.aggregate_train(1, replies)
    reasons = dict(guard.outcome.dropped)
    assert sorted(reasons) == [3, 4] and all("an update of norm" in why for why in reasons.values())
    assert arrays is not None and guard.outcome.accepted == 2


# --- client-side clipping (--client-dp client): the server checks what the clients did ---------

def update_norm(message: Message, start: dict) -> float:
    """The L2 norm of a reply's update over the floating arrays, in float64 (as the guard measures it)."""
    arrays = message.content["arrays"]
    return float(np.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - v) ** 2)
                             for k, v in start.items() if v.dtype.kind == "f")))


def test_under_client_side_clipping_an_update_longer_than_the_clipping_norm_is_dropped(tmp_path, caplog):
    clip = 0.5
    # Updates along one weight (so float32 holds their norm exactly): 1.5 C, C (1 - 1e-9) (which
    # float32 rounds to C itself), one float32 step above C, C (1 + 1e-3) and C / 2. The step
    # counter moved, as an honest client's does; the norm is the floating arrays'.
    lengths = {1: 1.5 * clip, 2: clip * (1 - 1e-9), 3: float(np.nextafter(np.float32(clip), np.float32(1))),
               4: clip * (1 + 1e-3), 5: clip / 2}

    def round_with(client_dp: str):
        config = config_of(tmp_path, clients=5, client_dp=client_dp, client_dp_clip=clip)
        guard = build_strategy(config, records(GLOBAL), SIZES + [80])
        sent = start_round(guard, FakeGrid({n: n - 1 for n in lengths}, 5))
        replies = [reply(sent[n], {**GLOBAL, "w": np.array([length, 0, 0, 0], np.float32), "count": np.array(5)},
                         honest_metrics(config, sent[n], n - 1, 40))
                   for n, length in lengths.items()]
        np.random.seed(0)
        assert guard.aggregate_train(1, replies)[0] is not None
        return guard.outcome, [update_norm(r, GLOBAL) for r in replies]

    o, norms = round_with("client")
    assert norms[:3] == [0.75, 0.5, 0.5 + 2 ** -24] and norms[3] > 0.5005
    assert (o.received, o.accepted, o.aggregated) == (5, 3, True)
    assert [node for node, _ in o.dropped] == [1, 4]
    assert "an update of norm 0.75, longer than the clipping norm 0.5 (the client did not clip it)" == o.dropped[0][1]
    assert "longer than the clipping norm 0.5" in o.dropped[1][1]
    assert "dropped the reply of node 1: an update of norm 0.75" in caplog.text
    # The server clips under server-side clipping: there every one of these replies is taken.
    o, _ = round_with("server")
    assert (o.accepted, o.dropped) == (5, [])


@pytest.mark.parametrize("values, weights, clip", [(10 ** 6, 1.0, 0.01), (4 * 10 ** 6, 0.05, 0.1)],
                         ids=["1e6 weights of 1, C 0.01", "4e6 weights of 0.05, C 0.1"])
def test_under_client_side_clipping_an_update_flowers_mod_clipped_is_always_taken(tmp_path, values, weights, clip):
    # Float32 rounding puts an honestly clipped update above C by more than a relative 1e-6 here:
    # global + clipped update is rounded to float32, and the client sums squares in float32.
    from flwr.app import Context
    from flwr.clientapp.mod import fixedclipping_mod

    from gankit.server.strategy import CLIP_TOLERANCE

    rng = np.random.default_rng(0)
    start = {"w": (rng.normal(size=values) * weights).astype(np.float32),
             "b": (rng.normal(size=(values // 1000, 10)) * weights).astype(np.float32), "count": np.array(0)}
    config = config_of(tmp_path, client_dp="client", client_dp_clip=clip)
    guard = build_strategy(config, records(start), SIZES)
    sent = {m.metadata.dst_node_id: m for m in guard.configure_train(
        1, records(start), ConfigRecord({"config-json": "{}"}), FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, 4))}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    replies = []
    for node, message in sent.items():
        # Trained weights, far longer than C from the global model (the step counter stays: Flower's
        # clipping counts it in the norm, which would leave the weights well inside C).
        trained = {k: v + (rng.normal(size=v.shape) * 1e-3).astype(np.float32) if v.dtype.kind == "f" else v
                   for k, v in start.items()}

        def local_training(msg, ctx, trained=trained, client=node - 1):
            return reply(msg, trained, honest_metrics(config, msg, client))

        replies.append(fixedclipping_mod(message, context, local_training))
    norms = [update_norm(r, start) for r in replies]
    assert max(norms) > clip * (1 + CLIP_TOLERANCE) and min(norms) > clip * (1 - 1e-4)
    np.random.seed(0)
    guard.aggregate_train(1, replies)
    assert (guard.outcome.accepted, guard.outcome.dropped) == (4, [])


def sent_by_a_grid(sent: dict[int, Message]) -> dict[int, Message]:
    """The messages as Flower's grids send them: each gets its id, in place."""
    from uuid import uuid4

    for message in sent.values():
        message.metadata.__dict__["_message_id"] = uuid4().hex
    return sent


def test_a_reply_to_an_earlier_rounds_message_is_dropped(tmp_path):
    # Flower's grid pulls only the replies to this round's messages and the SuperLink refuses a
    # reply to a message it has deleted (tests/test_hostile_deployment.py); the guard refuses it too.
    config = config_of(tmp_path, clients=3)
    guard = build_strategy(config, records(GLOBAL), SIZES[:3])
    grid = FakeGrid({1: 0, 2: 1, 3: 2}, 3)
    first = sent_by_a_grid(start_round(guard, grid, 1))
    guard.aggregate_train(1, [reply(first[n], honest_arrays(n - 1), honest_metrics(config, first[n], n - 1))
                              for n in (1, 2, 3)])
    second = sent_by_a_grid(start_round(guard, grid, 2))
    late = reply(first[1], honest_arrays(0), honest_metrics(config, first[1], 0))  # node 1 answers round 1 again
    honest = [reply(second[n], honest_arrays(n - 1), honest_metrics(config, second[n], n - 1)) for n in (2, 3)]
    arrays, _ = guard.aggregate_train(2, [late] + honest)
    assert len(guard.outcome.dropped) == 1
    node, why = guard.outcome.dropped[0]
    assert node == 1 and "not to this round's" in why
    assert np.array_equal(arrays["w"].numpy(), np.full(4, 2.5, np.float32))  # nodes 2 and 3 only


def test_max_step_is_measured_from_the_global_model_the_node_was_sent(tmp_path):
    config = config_of(tmp_path, clients=3)
    guard = build_strategy(config, records(GLOBAL), SIZES[:3])
    # A global model far from zero: replies near it pass, a reply back at zero moves too far.
    far = {k: v + 5e6 if v.dtype.kind == "f" else v for k, v in GLOBAL.items()}
    sent = {m.metadata.dst_node_id: m for m in guard.configure_train(
        1, records(far), ConfigRecord({"config-json": "{}"}), FakeGrid({1: 0, 2: 1, 3: 2}, 3))}
    near = [{k: v + i if v.dtype.kind == "f" else v for k, v in far.items()} for i in (1, 2)]
    replies = [reply(sent[n], values, honest_metrics(config, sent[n], n - 1)) for n, values in zip((1, 2), near)]
    replies.append(reply(sent[3], honest_arrays(2), honest_metrics(config, sent[3], 2)))
    arrays, _ = guard.aggregate_train(1, replies)
    assert [node for node, _ in guard.outcome.dropped] == [3] and "moves 5e+06" in guard.outcome.dropped[0][1]
    assert np.array_equal(arrays["w"].numpy(), np.full(4, 5000001.5, np.float32))


def test_an_honest_round_at_fifty_times_the_default_learning_rate_stays_far_below_max_step(tmp_path):
    from gankit.federated import local_round, statistics_keys

    lr, steps = 1e-2, 20
    config = config_of(tmp_path, clients=2, local_steps=steps, g_lr=lr, d_lr=lr)
    data = synthetic_data()
    model = GlobalModel(config, data, RunDir(tmp_path))
    start = model.weights
    trained, _ = local_round(config, data, start, client=0, server_round=1)
    moves = {k: float((trained[k].double() - start[k].double()).abs().max())
             for k in trained if trained[k].is_floating_point()}
    statistics = statistics_keys(model.G, model.D, model.prior)
    # Adam's step is at most lr (1 - beta1) / sqrt(1 - beta2) (Kingma and Ba 2015, 2.1); running
    # statistics follow the activations instead.
    adam_bound = lr * (1 - 0.5) / (1 - 0.999) ** 0.5 * steps
    assert 0 < max(v for k, v in moves.items() if k not in statistics) <= adam_bound
    assert max(moves.values()) < 10 < MAX_STEP / 1e4


# --- a global model that stops being finite ---------------------------------------------------

def overflowing_aggregate(monkeypatch, from_round: int) -> None:
    """From `from_round` on, the aggregate of the accepted (finite) replies overflows, as a
    server optimizer's step or client-level noise can make it: one array holds an infinity."""
    from gankit.server.strategy import ReplyGuard

    aggregate = ReplyGuard.aggregate_train

    def overflowing(self, server_round, replies):
        arrays, metrics = aggregate(self, server_round, replies)
        if arrays is not None and self.outcome.round >= from_round:
            key = next(iter(arrays.keys()))
            value = arrays[key].numpy().copy()
            value.flat[0] = np.inf
            arrays[key] = Array(value)
        return arrays, metrics

    monkeypatch.setattr(ReplyGuard, "aggregate_train", overflowing)


def last_checkpoint_by_round(monkeypatch) -> dict[int, bytes]:
    """The bytes of last.safetensors as each round left it."""
    saved = {}
    end_round = GlobalModel.end_round

    def recording(self, server_round, *args, **kwargs):
        record = end_round(self, server_round, *args, **kwargs)
        saved[server_round] = self.run.checkpoint_path("last").read_bytes()
        return record

    monkeypatch.setattr(GlobalModel, "end_round", recording)
    return saved


def npz_dataset(tmp_path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 200))
    return f"npz:{path}"


def rounds_in_history(run_path) -> list[int]:
    import json

    return [json.loads(line)["round"] for line in (run_path / "history.jsonl").read_text().splitlines()]


def test_the_server_refuses_a_non_finite_model_before_it_writes_the_round(tmp_path):
    import torch

    from gankit.errors import TrainingDiverged
    from gankit.federated import split_for_sync

    config = config_of(tmp_path, name="div", clients=2, rounds=3, sync="d")
    run = RunDir.create(config)
    model = GlobalModel(config, synthetic_data(), run)
    model.end_round(1, model.train_generator(split_for_sync(model.weights, "d")[0], 1), {})
    kept, before = run.checkpoint_path("last").read_bytes(), model.weights
    # --sync d: an aggregated D with a NaN stops the round before G trains against it ...
    d = {k: v.clone() for k, v in split_for_sync(model.weights, "d")[0].items()}
    next(v for v in d.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"the aggregated D became non-finite in round 2 \(d\..*; the last "
                                               r"good checkpoint is round 1 \(.*last.safetensors\)"):
        model.train_generator(d, 2)
    assert all(torch.equal(model.weights[k], before[k]) for k in before)
    # ... and so does a global model that G's training (or the aggregation) made non-finite.
    weights = {k: v.clone() for k, v in model.weights.items()}
    weights["g.body.0.weight"].view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"the global model became non-finite in round 2 \(g.body.0.weight\)"):
        model.end_round(2, weights, {})
    assert model.round == 1 and [r["round"] for r in run.history()] == [1]
    assert run.checkpoint_path("last").read_bytes() == kept


def test_a_diverged_inline_federation_exits_3_with_the_last_good_round_and_resumes_from_it(tmp_path, monkeypatch,
                                                                                           capsys):
    from gankit import cli

    overflowing_aggregate(monkeypatch, from_round=3)
    saved = last_checkpoint_by_round(monkeypatch)
    argv = ["train", "--mode", "federated", "--simulation", "inline", "--clients", "2", "--rounds", "4",
            "--local-steps", "2", "--g-width", "8", "--d-width", "8", "--latent-dim", "8", "--batch-size", "32",
            "--eval-every", "0", "--no-progress", "--no-tensorboard", "--dataset", npz_dataset(tmp_path),
            "--out-dir", str(tmp_path), "--name", "fed"]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    run = tmp_path / "fed"
    assert "the global model became non-finite in round 3 (g." in err
    assert f"the last good checkpoint is round 2 ({run / 'checkpoints' / 'last.safetensors'})" in err
    assert rounds_in_history(run) == [1, 2]
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == saved[2]
    # Like a standard run's, the last good checkpoint resumes.
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert rounds_in_history(run) == [1, 2, 3, 4]


def test_a_diverged_ray_simulation_raises_with_the_last_good_round(tmp_path, monkeypatch):
    from gankit.data import load_data
    from gankit.errors import TrainingDiverged
    from gankit.server.simulation import simulate

    overflowing_aggregate(monkeypatch, from_round=2)
    saved = last_checkpoint_by_round(monkeypatch)
    config = tiny_config(tmp_path, mode="federated", clients=2, rounds=3, local_steps=2, name="ray",
                         dataset=npz_dataset(tmp_path), simulation="ray")
    run = RunDir.create(config)
    with pytest.raises(TrainingDiverged, match="non-finite in round 2.*last good checkpoint is round 1"):
        simulate(config, load_data(config.data), run)
    assert rounds_in_history(run.path) == [1]
    assert run.checkpoint_path("last").read_bytes() == saved[1]


def test_the_deployed_server_app_raises_a_divergence_to_flower_and_logs_it_in_the_run(tmp_path, monkeypatch):
    from flwr.app import Context

    from gankit.clients.app import app as client_app
    from gankit.errors import TrainingDiverged
    from gankit.server.app import main
    from gankit.server.inline_grid import InlineGrid

    overflowing_aggregate(monkeypatch, from_round=2)
    config = tiny_config(tmp_path, mode="federated", clients=2, rounds=3, local_steps=2, name="deployed",
                         dataset=npz_dataset(tmp_path))
    config.save(tmp_path / "run.json")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config": str(tmp_path / "run.json")})
    # Flower's ServerApp runner marks the run failed with the exception's text ("ServerApp failed
    # with exception: ..."), which `flwr ls` shows.
    with pytest.raises(TrainingDiverged, match="non-finite in round 2"):
        main(InlineGrid(client_app, 2), context)
    assert rounds_in_history(tmp_path / "deployed") == [1]
    logged = (tmp_path / "deployed" / "train.log").read_text()
    assert "round 1/3" in logged and "training diverged: the global model became non-finite in round 2" in logged
