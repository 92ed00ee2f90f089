"""Client-level DP-FedAvg with Poisson client sampling (server/dp_fedavg.py): the release is
the clipped sum over the expected count plus Gaussian noise of std z C / (q N), clients join
with probability q, and epsilon is the subsampled Gaussian's."""

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from gankit.server.dp_fedavg import PoissonDPFedAvg  # noqa: E402
from test_hostile_replies import FakeGrid  # noqa: E402 (also sets Flower's task identity)

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
