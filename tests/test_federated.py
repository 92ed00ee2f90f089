"""Federated mode: weights that travel, a client's round, the global model, Flower's apps."""

import json

import numpy as np
import pytest
import torch

from conftest import synthetic_data, tiny_config
from gankit.federated import (GlobalModel, client_config, client_partitions, local_round, pack,
                               sample_dp_plan, unpack)
from gankit.runs import RunDir
from gankit.sampling import load_generator
from gankit.statefile import load_state
from gankit.trainer import Trainer


def fed_config(tmp_path, **overrides):
    options = dict(mode="federated", clients=2, rounds=2, local_steps=4, conditional=True)
    options.update(overrides)
    return tiny_config(tmp_path, **options)


def distance(a: dict, b: dict) -> float:
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)


def test_packed_weights_rebuild_the_same_networks(tmp_path):
    data = synthetic_data()
    a = Trainer(client_config(fed_config(tmp_path), 0, 1, 64), data, None)
    b = Trainer(client_config(fed_config(tmp_path), 1, 1, 64), data, None)
    weights = pack(a.G, a.D, a.prior)
    assert {k.split(".")[0] for k in weights} <= {"g", "d", "p"}
    unpack(weights, b.G, b.D, b.prior)
    assert distance(pack(b.G, b.D, b.prior), weights) == 0
    # DP noise on an aggregate can make a running variance negative: it comes back as zero.
    var = next(k for k in weights if k.endswith("running_var"))
    noised = dict(weights, **{var: weights[var] - 5.0})
    unpack(noised, b.G, b.D, b.prior)
    assert pack(b.G, b.D, b.prior)[var].min() == 0 and torch.isfinite(b.G.eval()(torch.randn(2, 16), torch.tensor([0, 1]))).all()


def test_a_client_trains_on_its_own_partition_and_fedprox_pulls_towards_the_global_weights(tmp_path):
    data = synthetic_data(n=256)
    config = fed_config(tmp_path, partition="pathological", classes_per_client=2)
    parts = client_partitions(config, data)
    start = GlobalModel(config, data, RunDir(tmp_path)).weights
    free, metrics = local_round(config, data, start, client=1, server_round=1)
    assert metrics["num-examples"] == len(parts[1])
    pulled, _ = local_round(config, data, start, client=1, server_round=1, proximal_mu=100.0)
    # Adam scales every step to about lr, so the pull shortens the walk rather than stopping it.
    d_only = (lambda w: {k: v for k, v in w.items() if k.startswith("d.")})  # D has no buffers
    assert 0 < distance(d_only(pulled), d_only(start)) < 0.75 * distance(d_only(free), d_only(start))


def test_the_global_model_checkpoints_rounds_that_generate_reads_and_resume_continues(tmp_path):
    data = synthetic_data()
    config = fed_config(tmp_path, name="fed", tensorboard=True)
    run = RunDir.create(config)
    model = GlobalModel(config, data, run)
    trained, _ = local_round(config, data, model.weights, client=0, server_round=1)
    model.end_round(1, trained, {"d_loss": 1.0})
    model.end_round(2, None, {})  # a round with too few replies keeps the model
    history = run.history()
    assert [r["round"] for r in history] == [1, 2]
    assert [r["aggregated"] for r in history] == [True, False]
    # Every round has its time; the run's time adds them up.
    assert history[1]["train_time_s"] == pytest.approx(history[0]["round_time_s"] + history[1]["round_time_s"], abs=2e-3)
    # ... and the process's peak memory so far, which can only grow (a test process holds
    # torch, so well above 50 MiB).
    assert 50 < history[0]["peak_rss_mb"] <= history[1]["peak_rss_mb"]
    assert (run.samples / "round_002.png").exists()
    # The same grid as standard training's: a column per class, 8 rows, fixed latents.
    from PIL import Image
    assert Image.open(run.samples / "round_002.png").size == Image.open(run.samples / "round_001.png").size
    assert "weights" not in load_state(run.checkpoint_path("last"))  # the networks are saved once
    assert list((run.path / "tb").glob("events.out.tfevents.*"))  # TensorBoard, as in standard runs
    again = GlobalModel(config, data, run)
    again.resume()
    assert again.round == 2 and distance(again.weights, trained) == 0
    assert again.train_time == pytest.approx(history[1]["train_time_s"], abs=2e-3)
    gen = load_generator(run.path)  # what `gankit generate/evaluate` use
    assert distance({k: v for k, v in gen.G.state_dict().items()},
                    {k[2:]: v for k, v in trained.items() if k.startswith("g.")}) == 0


def test_client_level_epsilon_matches_flowers_accountant():
    from gankit.privacy import client_level_epsilon

    # Flower's RdpAccountant (dp-accounting, no amplification), noise 1, 2 rounds, delta 1e-5.
    assert client_level_epsilon(1.0, 2, 1e-5) == pytest.approx(7.0774, abs=1e-3)
    assert client_level_epsilon(1.0, 4, 1e-5) > client_level_epsilon(1.0, 2, 1e-5)


def test_sample_level_dp_plans_each_clients_noise_and_the_server_accounts_like_opacus(tmp_path):
    from opacus.accountants import PRVAccountant

    data = synthetic_data(n=256)
    config = fed_config(tmp_path, name="sdp", sample_dp=True, target_epsilon=4.0, rounds=3,
                        local_steps=5, batch_size=16, partition="dirichlet", dirichlet_alpha=0.5)
    parts = client_partitions(config, data)
    assert len(parts[0]) != len(parts[1])  # unequal shares: unequal sample rates and noise
    plan = sample_dp_plan(config, data)  # what the server sends each client and accounts from
    run = RunDir.create(config)
    model = GlobalModel(config, data, run)
    replies = {}
    for rnd, clients in ((1, (0, 1)), (2, (0,)), (3, (0,))):  # client 1 misses rounds 2 and 3
        for c in clients:
            _, replies[c, rnd] = local_round(config, data, model.weights, client=c, server_round=rnd,
                                             noise_multiplier=plan[c]["noise-multiplier"],
                                             steps=plan[c]["dp-steps"])
            # The client did what it was sent (Opacus' own noise and step count).
            assert {k: replies[c, rnd][k] for k in plan[c]} == plan[c]
        record = model.end_round(rnd, None, {}, model.account_sample_dp([plan[c] for c in clients]))

    def opacus_epsilon(m, steps):  # Opacus' own accountant, stepped one private step at a time
        acc = PRVAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=m["noise-multiplier"], sample_rate=m["sample-rate"])
        return acc.get_epsilon(m["delta"])

    for c in (0, 1):
        n = len(parts[c])
        assert plan[c]["sample-rate"] == pytest.approx(1 / np.ceil(n / 16)) and plan[c]["dp-steps"] == 5
        assert plan[c]["num-examples"] == n
    # Client 0 trained all 3 planned rounds: it ends at (just below) the target.
    assert opacus_epsilon(plan[0], 15) == pytest.approx(replies[0, 3]["epsilon"], rel=1e-6)
    assert 3.9 < replies[0, 3]["epsilon"] <= 4.0
    # Client 1 was sent 5 steps only; the server counts what it sent, not the worst case.
    eps = record["epsilon_per_client"]
    assert eps["1"] == pytest.approx(opacus_epsilon(plan[1], 5), abs=1e-4) and eps["1"] < 0.8 * eps["0"]
    assert record["epsilon"] == pytest.approx(eps["0"], abs=1e-4)
    assert plan[0]["noise-multiplier"] != plan[1]["noise-multiplier"]
    # The account survives a resume.
    again = GlobalModel(config, data, run)
    again.resume()
    assert again.account_sample_dp([])["epsilon_per_client"] == eps


# --- Flower ------------------------------------------------------------------------------------

flwr = pytest.importorskip("flwr")


def flower_message(weights: dict, config: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    # Outside a running federation a Message needs a task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)}),
                   dst_node_id=7, message_type=MessageType.TRAIN)


def npz_config(tmp_path, **overrides):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 300))
    return fed_config(tmp_path / "runs", dataset=f"npz:{path}", **overrides)


def test_client_app_returns_both_networks_and_clips_its_update_when_asked(tmp_path):
    from flwr.app import ArrayRecord, Context, RecordDict

    from gankit.clients.app import app
    from gankit.server.strategy import build_strategy
    from gankit.data import load_data

    config = npz_config(tmp_path)
    start = GlobalModel(config, load_data(config.data), RunDir(tmp_path)).weights
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    sent = {"config-json": json.dumps(config.to_dict()), "server-round": 1}
    reply = app(flower_message(start, sent), context)
    weights = reply.content["arrays"].to_torch_state_dict()
    assert list(weights) == list(start) and distance(weights, start) > 0.01
    assert reply.content["metrics"]["num-examples"] == len(client_partitions(config, load_data(config.data))[1])
    clipped = app(flower_message(start, {**sent, "clipping_norm": 0.01}), context)
    update = clipped.content["arrays"].to_torch_state_dict()
    assert distance(update, start) <= 0.01 + 1e-5
    # The server's guard takes both replies as they are: the model's arrays, the expected metrics.
    sizes = [len(p) for p in client_partitions(config, load_data(config.data))]
    guard = build_strategy(config, ArrayRecord(start), sizes)
    assert guard.problem_with(reply, 7, set()) is None and guard.problem_with(clipped, 7, set()) is None


def test_a_client_keeps_its_adam_moments_between_rounds_when_asked(tmp_path):
    from flwr.app import Context, RecordDict

    from gankit.clients.app import app, kept_state
    from gankit.data import load_data

    config = npz_config(tmp_path, client_optimizer="keep")
    data = load_data(config.data)
    start = GlobalModel(config, data, RunDir(tmp_path)).weights
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    sent = {"config-json": json.dumps(config.to_dict())}
    app(flower_message(start, {**sent, "server-round": 1}), context)
    kept = kept_state(context)  # in the node's Flower state, without pickle
    assert {int(v["step"]) for v in kept["d_opt"]["state"].values()} == {config.federated.local_steps}
    second = app(flower_message(start, {**sent, "server-round": 2}), context)
    # Bit-exactly what the carried state gives without Flower in between, and not a fresh Adam.
    carry = {}
    local_round(config, data, start, client=1, server_round=1, carry=carry)
    expected, _ = local_round(config, data, start, client=1, server_round=2, carry=carry)
    fresh, _ = local_round(config.updated({"client_optimizer": "reset"}), data, start, client=1, server_round=2)
    got = second.content["arrays"].to_torch_state_dict()
    assert distance(got, expected) == 0 and distance(got, fresh) > 0
    assert int(next(iter(kept_state(context)["d_opt"]["state"].values()))["step"]) == 2 * config.federated.local_steps


def test_guard_drops_nan_replies_and_robust_aggregation_survives_a_poisoned_client(tmp_path):
    from test_hostile_replies import FakeGrid, honest_metrics, records, reply, start_round

    from gankit.server.strategy import build_strategy

    honest = [{"w": np.full(4, float(i), np.float32)} for i in (1, 2, 3)]

    def aggregate(strategy, poison):
        config = tiny_config(tmp_path, mode="federated", clients=4, strategy=strategy)
        guard = build_strategy(config, records({"w": np.zeros(4, np.float32)}), [10] * 4)
        sent = start_round(guard, FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, 4))
        replies = [reply(sent[i + 1], w, honest_metrics(config, sent[i + 1], i, examples=10))
                   for i, w in enumerate(honest + [poison])]
        arrays, _ = guard.aggregate_train(1, replies)
        return arrays.to_numpy_ndarrays()[0], guard.outcome

    w, outcome = aggregate("fedavg", {"w": np.full(4, np.nan, np.float32)})
    assert len(outcome.dropped) == 1 and np.array_equal(w, np.full(4, 2.0))  # NaN reply dropped
    w, _ = aggregate("fedavg", {"w": np.full(4, 1e6, np.float32)})
    assert np.abs(w).max() > 1e5  # a well-formed but huge reply passes the guard: a plain mean is ruined...
    for robust in ("trimmed-mean", "fedmedian", "krum"):
        w, _ = aggregate(robust, {"w": np.full(4, 1e6, np.float32)})
        assert np.abs(w).max() <= 3.0, robust  # ...a robust aggregate is not


@pytest.mark.parametrize("strategy_options", [
    dict(strategy="fedadam", server_lr=0.1),
    dict(strategy="fedavgm", server_step=2.0, server_momentum=0.9)], ids=["fedadam", "fedavgm"])
def test_server_optimizers_resume_with_their_state(tmp_path, strategy_options):
    """FedAdam's moments and FedAvgM's momentum are saved with a round and loaded on resume:
    the resumed round takes the step the uninterrupted run takes."""
    from test_hostile_replies import FakeGrid, honest_metrics, records, reply

    from flwr.app import ConfigRecord

    from gankit.server.strategy import build_strategy, load_strategy_state, strategy_state

    config = tiny_config(tmp_path, mode="federated", clients=2, **strategy_options)
    grid = FakeGrid({1: 0, 2: 1}, 2)

    def round_of(strategy, server_round, global_w, values):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, records({"w": global_w}), ConfigRecord({}), grid)}
        replies = [reply(sent[node], {"w": np.array(v, np.float32)},
                         honest_metrics(config, sent[node], node - 1, examples=10)) for node, v in zip((1, 2), values)]
        return strategy.aggregate_train(server_round, replies)[0].to_numpy_ndarrays()[0]

    start = np.zeros(3, np.float32)
    first = build_strategy(config, records({"w": start}), [10, 10])
    after_1 = round_of(first, 1, start, [[1.0, 2, 3], [3.0, 2, 1]])
    saved = strategy_state(first)
    expected = round_of(first, 2, after_1, [[0.5, -1, 2], [1.5, 0, 2]])

    def resumed(state):  # a resumed run: rounds offset by 1, the saved state loaded
        strategy = build_strategy(config, records({"w": start}), [10, 10], round_offset=1)
        load_strategy_state(strategy, state)
        return round_of(strategy, 1, after_1, [[0.5, -1, 2], [1.5, 0, 2]])

    assert np.array_equal(resumed(saved), expected)
    assert not np.allclose(resumed({}), expected)  # restarting the moments changes the step


def test_fedavgm_moves_by_the_server_step_times_the_mean_update(tmp_path):
    from test_hostile_replies import FakeGrid, honest_metrics, records, reply

    from flwr.app import ConfigRecord

    from gankit.server.strategy import build_strategy

    config = tiny_config(tmp_path, mode="federated", clients=2, strategy="fedavgm", server_step=2.0)
    strategy = build_strategy(config, records({"w": np.zeros(2, np.float32)}), [10, 10])
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, records({"w": np.zeros(2, np.float32)}), ConfigRecord({}), FakeGrid({1: 0, 2: 1}, 2))}
    replies = [reply(sent[node], {"w": np.array(v, np.float32)}, honest_metrics(config, sent[node], node - 1, examples=10))
               for node, v in zip((1, 2), ([1.0, 2.0], [3.0, 0.0]))]
    new = strategy.aggregate_train(1, replies)[0].to_numpy_ndarrays()[0]
    assert np.allclose(new, [4.0, 2.0])  # 2 x the mean update (2, 1): the sum of the two


def test_a_server_optimizer_averages_running_statistics_plainly(tmp_path):
    """FedAvgM's server step extrapolates weights; BatchNorm's running variance must stay the
    clients' mean (stepped, it grew to 3e9 in 20 rounds), in this round and the next."""
    from test_hostile_replies import FakeGrid, honest_metrics, records, reply

    from flwr.app import ConfigRecord

    from gankit.server.strategy import build_strategy

    config = tiny_config(tmp_path, mode="federated", clients=2, strategy="fedavgm", server_step=2.0)
    start = {"w": np.zeros(2, np.float32), "bn.running_var": np.ones(2, np.float32)}
    strategy = build_strategy(config, records(start), [10, 10], statistics_keys=frozenset({"bn.running_var"}))
    grid = FakeGrid({1: 0, 2: 1}, 2)

    def one_round(round_, arrays, client_values):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(round_, records(arrays),
                                                                             ConfigRecord({}), grid)}
        replies = [reply(sent[node], values, honest_metrics(config, sent[node], node - 1, examples=10))
                   for node, values in zip((1, 2), client_values)]
        return {k: v.numpy() for k, v in strategy.aggregate_train(round_, replies)[0].items()}

    new = one_round(1, start, [{"w": np.array([1.0, 2.0], np.float32), "bn.running_var": np.array([2.0, 4.0], np.float32)},
                               {"w": np.array([3.0, 0.0], np.float32), "bn.running_var": np.array([4.0, 2.0], np.float32)}])
    assert np.allclose(new["w"], [4.0, 2.0])  # stepped: 2 x the mean update
    assert np.allclose(new["bn.running_var"], [3.0, 3.0])  # the mean, not 1 + 2 x 2
    # Round 2 starts from the plain mean: clients that keep the statistics at 3 leave them there.
    again = one_round(2, new, [{"w": new["w"], "bn.running_var": np.full(2, 3.0, np.float32)}] * 2)
    assert np.allclose(again["bn.running_var"], 3.0) and np.allclose(again["w"], new["w"])


@pytest.mark.parametrize("simulation", ["ray", "inline"])
def test_simulated_rounds_survive_a_failing_client_and_resume_from_the_last_round(tmp_path, simulation):
    from flwr.clientapp import ClientApp

    from gankit.clients.app import identify, local_training
    from gankit.server.simulation import simulate
    from gankit.data import load_data

    flaky = ClientApp()
    flaky.query()(identify)  # names its partition, as the project's client does

    @flaky.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == 0 and int(msg.content["config"]["server-round"]) == 1:
            raise RuntimeError("client 0 lost its connection")
        return local_training(msg, context)

    # With sample-level DP on, so the privacy account travels through Flower and the resume.
    config = npz_config(tmp_path, clients=3, rounds=1, name="fl", sample_dp=True, noise_multiplier=1.0,
                        simulation=simulation)
    data = load_data(config.data)
    run = RunDir.create(config)
    simulate(config, data, run, client_app=flaky)
    first = run.history()
    assert len(first) == 1 and first[0]["aggregated"] and first[0]["failed"] == 1
    assert first[0]["clients-replied"] == 2 and first[0]["dropped"] == 0
    longer = config.updated({"rounds": 2})
    model = simulate(longer, data, run, resume=True)
    assert [r["round"] for r in run.history()] == [1, 2] and model.round == 2
    assert (run.path / "partition.json").exists()
    # Client 0 failed in round 1 but was sent it: the server charges it like the others (it cannot
    # tell how far the client got). Equal partitions, equal plans: equal accounts, kept across the resume.
    assert set(first[0]["epsilon_per_client"]) == {"0", "1", "2"}
    eps = run.history()[1]["epsilon_per_client"]
    assert eps["0"] == eps["1"] == eps["2"] > first[0]["epsilon_per_client"]["0"]
    assert run.history()[1]["epsilon"] == pytest.approx(max(eps.values()), abs=1e-4)


def test_inline_simulation_trains_the_model_ray_trains(tmp_path):
    """The same clients, strategy and seeds in one process: the global model after two rounds
    (here with client-level DP, whose noise the server draws) is the one Flower's Ray engine
    gives, up to the order in which replies are summed (Ray's is the order they arrive in)."""
    from gankit.data import load_data
    from gankit.server.simulation import simulate

    weights, histories = {}, {}
    for simulation in ("ray", "inline"):
        (tmp_path / simulation).mkdir()
        config = npz_config(tmp_path / simulation, clients=3, rounds=2, name="fl", simulation=simulation,
                            client_dp="server", client_dp_noise=0.5, client_dp_clip=1.0)
        run = RunDir.create(config)
        model = simulate(config, load_data(config.data), run)
        weights[simulation] = model.weights
        histories[simulation] = [{k: v for k, v in r.items() if "time" not in k and k not in ("eta_s", "peak_rss_mb")}
                                 for r in run.history()]
    assert weights["ray"].keys() == weights["inline"].keys()
    for key in weights["ray"]:
        assert torch.allclose(weights["ray"][key].double(), weights["inline"][key].double(),
                              rtol=1e-4, atol=1e-6), key
    assert len(histories["ray"]) == len(histories["inline"]) == 2
    for ray, inline in zip(histories["ray"], histories["inline"]):
        assert ray.keys() == inline.keys()
        for key, value in ray.items():
            assert inline[key] == (pytest.approx(value, rel=1e-3) if isinstance(value, float) else value), key


def test_ctrl_c_in_a_simulation_stops_after_the_round_saves_and_exits(tmp_path):
    """The first Ctrl-C ends the run at the round's end with its checkpoint (exit 130), as in
    standard training; it used to print "aborted" and hang on the server thread."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "fed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "gankit.cli", "train", "--mode", "federated", "--clients", "2",
            "--rounds", "50", "--local-steps", "2", "--g-width", "8", "--d-width", "8",
            "--latent-dim", "8", "--batch-size", "16", "--eval-every", "0", "--no-progress",
            "--no-tensorboard", "--dataset", "mnist-5k", "--limit", "256", "--out-dir",
            str(tmp_path), "--name", "fed"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "history.jsonl").exists():
            time.sleep(0.5)
        assert (run / "history.jsonl").exists(), "no round finished"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "--resume" in err
    rounds = [json.loads(line)["round"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert rounds and rounds[-1] < 50
    from gankit.statefile import load_state
    assert load_state(run / "checkpoints" / "last.safetensors")["round"] == rounds[-1]


def test_the_watchdog_ends_a_killed_processs_children(tmp_path):
    """kill -9 of a simulation left Ray's agents running; the watchdog beside the driver
    kills the descendants it last saw once the driver is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from gankit.server.watchdog import PROC, alive

    if not PROC.is_dir():
        pytest.skip("the watchdog reads /proc (Linux)")
    pid_file = tmp_path / "child.pid"
    driver = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from gankit.server.watchdog import start_for_this_process\n"
        "start_for_this_process()\n"
        f"child = subprocess.Popen(['sleep', '120'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")], start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline and not pid_file.exists():
        time.sleep(0.1)
    child = int(pid_file.read_text())
    time.sleep(3)  # the watchdog's first looks (every second) at the driver's children, on a busy machine too
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline and alive(child):
        time.sleep(0.2)
    assert not alive(child) or open(f"/proc/{child}/stat").read().split()[2] == "Z"


def test_sync_d_sends_d_alone_and_the_server_trains_g_against_the_aggregated_d(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from gankit.clients.app import app
    from gankit.data import load_data
    from gankit.server.strategy import build_strategy
    from test_hostile_replies import FakeGrid

    config = npz_config(tmp_path, sync="d", name="syncd")
    data = load_data(config.data)
    model = GlobalModel(config, data, RunDir.create(config))
    start = {k: v.clone() for k, v in model.weights.items()}  # pack() shares the networks' memory
    sizes = [len(p) for p in client_partitions(config, data)]
    strategy = build_strategy(config, ArrayRecord(start), sizes, train_generator=model.train_generator)
    grid = FakeGrid({11: 0, 12: 1}, 2)
    sent = strategy.configure_train(1, ArrayRecord(start), ConfigRecord({"config-json": json.dumps(config.to_dict())}), grid)
    replies = []
    for message in sent:
        assert {k[:2] for k in message.content["arrays"]} == {"d."}
        assert "g." in {k[:2] for k in message.content["generator"]} <= {"g.", "p."}
        node = message.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 11, "num-partitions": 2},
                          state=RecordDict(), run_config={})
        replies.append(app(message, context))
    d_of = [r.content["arrays"].to_torch_state_dict() for r in replies]
    assert all({k[:2] for k in d} == {"d."} for d in d_of)  # D alone travels back
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.outcome.aggregated and strategy.outcome.accepted == 2
    new = arrays.to_torch_state_dict()
    # D is the mean of the clients' Ds; G moved on the server (the clients never step it).
    for key in (k for k in d_of[0] if d_of[0][k].is_floating_point()):
        assert torch.allclose(new[key], (d_of[0][key] + d_of[1][key]) / 2, atol=1e-6)
    g_only = (lambda w: {k: v for k, v in w.items() if k.startswith("g.")})
    assert distance(g_only(new), g_only(start)) > 0
    # The server's G optimizer is part of the run's checkpoint.
    model.end_round(1, new, {})
    again = GlobalModel(config, data, model.run)
    again.resume()
    steps = {int(v["step"]) for v in again.g_opt.state_dict()["state"].values()}
    assert steps == {config.federated.local_steps // 1}


def test_the_eta_follows_the_recent_pace_not_a_slow_first_round(tmp_path, caplog):
    import logging

    from gankit.recorder import Recorder

    config = fed_config(tmp_path, rounds=10, name="eta")
    run = RunDir.create(config)
    recorder = Recorder(run, config, "round", 10)
    elapsed = 0.0
    with caplog.at_level(logging.INFO, logger="gankit"):
        for done, seconds in enumerate([400.0, 50.0, 50.0, 50.0], start=1):  # Ray's start-up, then 50 s
            elapsed += seconds
            recorder.end({"round": done, "train_time_s": elapsed}, None, lambda name, best: None)
    assert "round 4/10" in caplog.records[-1].getMessage()
    assert "50.0s/round, ETA 5m00s" in caplog.records[-1].getMessage()


def test_rounds_get_pr_curves_when_asked(tmp_path):
    """--pr-curves in a federation: each round's evaluation of the global G adds its PRD
    curve's F8 and F1/8 to the history and draws the curve, as an epoch's does."""
    from gankit.data import load_data
    from gankit.evaluate import metric_classifier

    config = npz_config(tmp_path, eval_every=1, eval_samples=100, pr_curves=True, rounds=2)
    data = load_data(config.data)
    run = RunDir.create(config)
    model = GlobalModel(config, data, run, metric_classifier("", data.image_shape, data.num_classes))
    for server_round in (1, 2):
        record = model.end_round(server_round, model.weights, {})
        assert 0 <= record["prd_f8"] <= 1 and 0 <= record["prd_f1_8"] <= 1
    assert sorted(p.name for p in (run.path / "prd").iterdir()) == ["round_001.png", "round_002.png"]
    assert [("prd_f8" in r, "prd_f1_8" in r) for r in run.history()] == [(True, True)] * 2


def test_inline_sample_level_dp_states_the_plan_once_not_every_clients_round(tmp_path, capsys):
    import numpy as np

    from gankit import cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (240, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 240))
    assert cli.main(["train", "--mode", "federated", "--sample-dp", "--target-epsilon", "8",
                     "--simulation", "inline", "--clients", "2", "--rounds", "2", "--local-steps", "2",
                     "--dataset", f"npz:{tmp_path / 'd.npz'}", "--g-width", "8", "--d-width", "8",
                     "--latent-dim", "8", "--batch-size", "32", "--eval-every", "0", "--no-progress",
                     "--no-tensorboard", "--out-dir", str(tmp_path), "--name", "f"]) == 0
    err = capsys.readouterr().err
    assert err.count("sample-level DP: every client's D trains with Opacus") == 1
    assert "dp: DP-SGD on D" not in err  # 2 clients x 2 rounds would have said it 4 times
    assert err.count("round 2/2") == 1


def test_the_eta_follows_a_slower_machine_at_once(tmp_path, caplog):
    import logging

    from gankit.recorder import Recorder

    config = fed_config(tmp_path, rounds=10, name="eta-load")
    recorder = Recorder(RunDir.create(config), config, "round", 10)
    elapsed = 0.0
    with caplog.at_level(logging.INFO, logger="gankit"):
        for done, seconds in enumerate([50.0, 50.0, 50.0, 50.0, 100.0], start=1):  # then a second job
            elapsed += seconds
            recorder.end({"round": done, "train_time_s": elapsed}, None, lambda name, best: None)
            if done == 4:
                assert "50.0s/round, ETA 5m00s" in caplog.records[-1].getMessage()
    # The median of the recent rounds is still 50 s; the machine now takes 100 s a round.
    assert "100.0s/round, ETA 8m20s" in caplog.records[-1].getMessage()
