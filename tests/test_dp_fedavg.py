"""Client-level DP-FedAvg with Poisson client sampling (server/dp_fedavg.py): the release is
the clipped sum over the expected count plus Gaussian noise of std z C / (q N), clients join
with probability q, and epsilon is the subsampled Gaussian's. With Flower's fixed-size wrappers
(--client-dp server|client) the release is the accepted clipped updates' sum over the clients
sampled, however many replies were lost, and an honest round's release is bit for bit the one
before that estimator."""

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from conftest import tiny_config  # noqa: E402
from gankit.server.dp_fedavg import PoissonDPFedAvg  # noqa: E402
from test_hostile_replies import (SIZES, FakeGrid, assert_same, config_of, honest_metrics,  # noqa: E402
                                  records, reply)  # (also sets Flower's task identity)

GLOBAL = {"w": np.zeros(3, np.float32), "count": np.array(4, np.int64)}


def arrays_of(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def reply_to(message: Message, w) -> Message:
    content = {"arrays": arrays_of({"w": np.asarray(w, np.float32), "count": np.array(9, np.int64)}),
               "metrics": MetricRecord({"num-examples": 1, "d_loss": 1.0})}
    return Message(RecordDict(content), reply_to=message)


def test_the_release_is_the_clipped_sum_over_the_expected_count(tmp_path):
    from gankit.server.strategy import mean_metrics

    strategy = PoissonDPFedAvg(clients=4, sample_rate=0.5, noise_multiplier=0.0, clipping_norm=1.0,
                               train_metrics_aggr_fn=mean_metrics)
    grid = FakeGrid({n: n - 1 for n in (1, 2, 3, 4)}, 4)
    strategy.rng = np.random.default_rng(3)
    sent = []
    while len(sent) < 2:  # a round in which at least two clients joined
        sent = list(strategy.configure_train(1, arrays_of(GLOBAL), ConfigRecord({}), grid))
    # One update of norm 5 (clipped to 1) and one of norm 0.5 (kept).
    replies = [reply_to(sent[0], [3.0, 4.0, 0.0]), reply_to(sent[1], [0.0, 0.0, 0.5])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    released = arrays.to_numpy_ndarrays()
    expected = (np.array([0.6, 0.8, 0.0]) + np.array([0.0, 0.0, 0.5])) / (0.5 * 4)
    assert np.allclose(released[0], expected, atol=1e-6)
    assert released[1] == 4  # an integer buffer stays the global model's
    assert metrics["clients-replied"] == 2


def test_the_noise_has_std_z_c_over_q_n_even_when_nobody_joined():
    strategy = PoissonDPFedAvg(clients=10, sample_rate=0.2, noise_multiplier=1.5, clipping_norm=0.4)
    big = {"w": np.zeros(40_000, np.float32), "count": np.array(0, np.int64)}
    strategy.configure_train(1, arrays_of(big), ConfigRecord({}), FakeGrid({n: n for n in range(10)}, 10))
    arrays, _ = strategy.aggregate_train(1, [])  # still released: skipping would reveal the sample
    noise = arrays.to_numpy_ndarrays()[0]
    assert noise.std() == pytest.approx(1.5 * 0.4 / (0.2 * 10), rel=0.03) and abs(noise.mean()) < 0.01


def test_clients_join_independently_with_probability_q():
    strategy = PoissonDPFedAvg(clients=200, sample_rate=0.1, noise_multiplier=1.0, clipping_norm=1.0)
    strategy.rng = np.random.default_rng(7)  # the product draws from OS entropy; a test must not flake
    grid = FakeGrid({n: n for n in range(200)}, 200)
    counts = [len(list(strategy.configure_train(r, arrays_of(GLOBAL), ConfigRecord({}), grid)))
              for r in range(1, 201)]
    # Binomial(200, 0.1): mean 20, variance 18. A fixed-size sample (like FedAvg's fraction) would
    # have variance 0; the mean of 200 rounds has std 0.3.
    assert abs(np.mean(counts) - 20) < 1
    assert 12 < np.var(counts) < 26


def test_client_level_epsilon_gains_amplification_from_poisson_sampling():
    from opacus.accountants import RDPAccountant

    from gankit.privacy import client_level_epsilon

    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.05, 300)]
    assert client_level_epsilon(1.1, 300, 1e-3, sample_rate=0.05) == pytest.approx(accountant.get_epsilon(1e-3))
    assert client_level_epsilon(1.1, 300, 1e-3, sample_rate=0.05) < 0.2 * client_level_epsilon(1.1, 300, 1e-3)


def test_poisson_client_dp_refuses_another_strategy(tmp_path):
    from conftest import tiny_config
    from gankit.config import validate
    from gankit.errors import ConfigError

    with pytest.raises(ConfigError, match="client-dp poisson is its own DP-FedAvg"):
        validate(tiny_config(tmp_path, mode="federated", client_dp="poisson", strategy="fedadam"))


def test_the_guard_lets_poisson_dp_release_a_round_without_replies(tmp_path):
    from conftest import tiny_config
    from gankit.server.strategy import build_strategy

    config = tiny_config(tmp_path, mode="federated", clients=4, client_dp="poisson", fraction_train=0.5,
                         client_dp_noise=1.0, client_dp_clip=1.0)
    guard = build_strategy(config, arrays_of(GLOBAL), [10, 10, 10, 10])
    guard.configure_train(1, arrays_of(GLOBAL), ConfigRecord({"config-json": "{}"}), FakeGrid({n: n - 1 for n in (1, 2, 3, 4)}, 4))
    arrays, _ = guard.aggregate_train(1, [])
    assert guard.outcome.aggregated and arrays is not None
    assert not np.allclose(arrays.to_numpy_ndarrays()[0], 0)  # the noise was released


# --- --client-dp server|client: Flower's wrappers around a fixed-denominator mean -------------
# Flower adds noise of std z C / m (m: the clients sampled) to what the strategy inside returns.
# The mean of the m' replies the guard accepts would have sensitivity C / m': each dropped reply
# or failed client would weaken the noise below the z the epsilon is computed for. The release
# is global + (sum of the accepted clipped updates) / m + N(0, (z C / m)^2) instead
# (server/strategy.py: FixedDenominator).

DP_GLOBAL = {"w": np.array([0.5, -1.0, 2.0, 0.25], np.float32), "b": np.full((2, 3), 0.125, np.float32),
             "count": np.array(3, np.int64)}
# Updates whose clipping to C = 1 is exact in binary: client 1's has norm 2 (halved), the others
# are shorter than C. The step counters stay (Flower's clipping counts them in the norm).
UPDATES = {1: {"w": [2.0, 0, 0, 0], "b": np.zeros((2, 3))},
           2: {"w": [0, 0.5, 0, 0], "b": [[0.25, 0, 0], [0, 0, 0]]},
           3: {"w": np.zeros(4), "b": [[0, 0, 0], [-0.5, -0.5, -0.5]]},
           4: {"w": [0, 0, 0.5, 0], "b": np.zeros((2, 3))}}
CLIPPED = {**UPDATES, 1: {"w": [1.0, 0, 0, 0], "b": np.zeros((2, 3))}}


def moved(update: dict) -> dict:
    return {**DP_GLOBAL,
            **{k: (DP_GLOBAL[k] + np.asarray(v, np.float64)).astype(np.float32) for k, v in update.items()}}


def pattern(shape) -> np.ndarray:
    """A known noise shape: 0, 1, -1, 0, 1, -1, ... (0 for a scalar)."""
    return (np.arange(1, 1 + int(np.prod(shape))) % 3 - 1).reshape(shape).astype(np.float64)


def known_noise(monkeypatch) -> list[float]:
    """Flower's DP wrappers add std * pattern instead of Gaussian noise; the stds they asked for."""
    from flwr.serverapp.strategy import dp_fixed_clipping

    stds = []

    def add(arrays, std):
        stds.append(std)
        for array in arrays:
            array += (std * pattern(array.shape)).astype(array.dtype)

    monkeypatch.setattr(dp_fixed_clipping, "add_gaussian_noise_inplace", add)
    return stds


@pytest.mark.parametrize("lost", ["malformed", "failed"])
@pytest.mark.parametrize("client_dp", ["server", "client"])
def test_client_level_dp_divides_the_accepted_updates_by_the_clients_sampled(tmp_path, monkeypatch, client_dp, lost):
    from flwr.app import Error

    from gankit.server.strategy import build_strategy

    stds = known_noise(monkeypatch)
    config = config_of(tmp_path, client_dp=client_dp, client_dp_noise=0.5, client_dp_clip=1.0)
    guard = build_strategy(config, records(DP_GLOBAL), SIZES)
    sent = {m.metadata.dst_node_id: m for m in guard.configure_train(
        1, records(DP_GLOBAL), ConfigRecord({"config-json": "{}"}), FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, 4))}
    sends = UPDATES if client_dp == "server" else CLIPPED  # client-side: each client clipped its own
    replies = [reply(sent[n], moved(sends[n]), honest_metrics(config, sent[n], n - 1)) for n in (1, 2, 3)]
    if lost == "malformed":  # node 4's reply is dropped by the guard ...
        replies.append(reply(sent[4], {**moved(sends[4]), "w": np.full(4, np.nan, np.float32)},
                             honest_metrics(config, sent[4], 3)))
    else:  # ... or its client fails, as an honest client can
        replies.append(Message(Error(code=1, reason="RuntimeError: CUDA out of memory"), reply_to=sent[4]))
    arrays, _ = guard.aggregate_train(1, replies)
    o = guard.outcome
    assert (o.accepted, len(o.dropped), len(o.failed)) == ((3, 1, 0) if lost == "malformed" else (3, 0, 1))
    assert stds == [0.5 * 1.0 / 4]  # z C / m, m = 4 sampled
    total = {k: sum(np.asarray(CLIPPED[n][k], np.float64) for n in (1, 2, 3)) for k in ("w", "b")}
    released = {k: v.numpy() for k, v in arrays.items()}
    # Exactly global + (sum of the three accepted clipped updates) / 4 + noise (every number here
    # is exact in binary) ...
    expected = {k: (DP_GLOBAL[k] + total[k] / 4 + stds[0] * pattern(DP_GLOBAL[k].shape)).astype(np.float32)
                for k in ("w", "b")}
    assert_same(released, {**expected, "count": DP_GLOBAL["count"]})  # the counters: the accepted replies' mean
    # ... not the mean of the three, whose sensitivity C / 3 the noise z C / 4 covers with 0.375, not 0.5.
    mean_of_three = (DP_GLOBAL["w"] + total["w"] / 3 + stds[0] * pattern(4)).astype(np.float32)
    assert not np.allclose(released["w"], mean_of_three, atol=1e-3)


def built_before_the_fixed_denominator(monkeypatch, config, global_arrays: ArrayRecord):
    """build_strategy as it was: Flower's own FedAvg or FedProx inside Flower's DP wrapper."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    from gankit.server import strategy

    with monkeypatch.context() as patch:
        for name, flower in (("FixedDenominatorFedAvg", FedAvg), ("FixedDenominatorFedProx", FedProx)):
            patch.setattr(strategy, name, lambda num_sampled_clients, flower=flower, **kwargs: flower(**kwargs))
        guard = strategy.build_strategy(config, global_arrays, SIZES)
    assert guard.fixed_denominator is None and type(guard.strategy.strategy) in (FedAvg, FedProx)
    return guard


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
@pytest.mark.parametrize("client_dp", ["server", "client"])
def test_an_honest_rounds_release_is_bit_identical_to_flowers_mean(tmp_path, monkeypatch, client_dp, strategy):
    # With every reply accepted the fixed denominator is the plain mean's: the release is the very
    # float32 array Flower's wrapper around Flower's FedAvg gave, so committed client-level DP
    # results reproduce.
    from flwr.supercore.differential_privacy import compute_clip_model_update

    from gankit.server.strategy import FixedDenominator, build_strategy

    rng = np.random.default_rng(11)
    start = {"w": rng.normal(size=40).astype(np.float32), "b": rng.normal(size=(3, 5)).astype(np.float32),
             "count": np.array(3, np.int64)}
    trained = []
    for _ in range(4):
        arrays = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items() if k != "count"}
        arrays["count"] = np.array(8, np.int64)
        if client_dp == "client":  # what fixedclipping_mod does on the client
            values = [arrays[k] for k in start]
            compute_clip_model_update(values, list(start.values()), 1.0)
            arrays = {k: np.asarray(v, start[k].dtype) for k, v in zip(start, values)}
        trained.append(arrays)
    config = config_of(tmp_path, client_dp=client_dp, client_dp_noise=0.7, client_dp_clip=1.0, strategy=strategy)

    def release(guard) -> dict:
        sent = guard.configure_train(1, records(start), ConfigRecord({"config-json": "{}"}),
                                     FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, 4))
        replies = [reply(m, trained[m.metadata.dst_node_id - 1], honest_metrics(config, m, m.metadata.dst_node_id - 1))
                   for m in sent]
        np.random.seed(3)  # Flower's noise
        arrays, _ = guard.aggregate_train(1, replies)
        assert guard.outcome.accepted == 4
        return {k: v.numpy() for k, v in arrays.items()}

    guard = build_strategy(config, records(start), SIZES)
    assert isinstance(guard.fixed_denominator, FixedDenominator)
    now, before = release(guard), release(built_before_the_fixed_denominator(monkeypatch, config, records(start)))
    assert_same(now, before)
    assert not np.array_equal(now["w"], start["w"])


def test_the_recorded_client_epsilon_with_a_failed_client_is_the_all_honest_runs(tmp_path, caplog):
    # The privacy record depends on the rounds alone; with the fixed denominator a failed client
    # leaves the mechanism (sensitivity C / m, noise z C / m) the one it accounts for.
    import logging

    from flwr.clientapp import ClientApp

    from gankit.clients.app import identify, local_training
    from gankit.data import load_data
    from gankit.privacy import client_level_epsilon, resolve_delta
    from gankit.runs import RunDir
    from gankit.server.simulation import simulate
    from test_hostile_replies import npz_dataset

    flaky = ClientApp()
    flaky.query()(identify)

    @flaky.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == 2 and int(msg.content["config"]["server-round"]) == 1:
            raise RuntimeError("client 2 lost its connection")
        return local_training(msg, context)

    dataset = npz_dataset(tmp_path)
    histories = {}
    caplog.set_level(logging.INFO, logger="gankit")
    for name, client_app in (("honest", None), ("flaky", flaky)):
        config = tiny_config(tmp_path, mode="federated", name=name, clients=4, rounds=2, local_steps=2,
                             dataset=dataset, simulation="inline", client_dp="server", client_dp_noise=0.8,
                             client_dp_clip=1.0)
        run = RunDir.create(config)
        simulate(config, load_data(config.data), run, client_app=client_app)
        histories[name] = run.history()
    assert [(r["failed"], r["clients-replied"], r["aggregated"]) for r in histories["flaky"]] == \
        [(1, 3, True), (0, 4, True)]
    assert [r["failed"] for r in histories["honest"]] == [0, 0]
    assert "round 1: the mean update is the sum of 3 accepted update(s) over the 4 clients sent" in caplog.text
    delta = resolve_delta(config.privacy.delta, 4)
    exact = [client_level_epsilon(0.8, rounds, delta) for rounds in (1, 2)]
    for name in ("flaky", "honest"):
        assert [r["client_epsilon"] for r in histories[name]] == exact
        assert {(r["client_delta"], r["client_dp_noise"], r["client_dp_clip"])
                for r in histories[name]} == {(delta, 0.8, 1.0)}
