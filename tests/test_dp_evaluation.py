"""Evaluation as the DP-generation papers do it: epsilon under RDP beside PRV, downstream
accuracy with the epoch chosen on generated images, and the DP-SGD classifier baseline."""

import warnings

import pytest
import torch

from conftest import tiny_config, train
from gankit.metrics.downstream import synthetic_to_real

opacus = pytest.importorskip("opacus")
from opacus.accountants import create_accountant  # noqa: E402


def blocks(n, seed, label_noise=0.0):
    """Separable 28x28 images: class c lights a 4x4 block at position c, plus noise;
    `label_noise` replaces that share of labels by random ones."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(10, (n,), generator=gen)
    x = torch.randn(n, 1, 28, 28, generator=gen) * 0.3 - 0.5
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 5)
        x[i, 0, 4 + 10 * r:8 + 10 * r, 2 + 5 * col:6 + 5 * col] += 1.5
    flip = torch.rand(n, generator=gen) < label_noise
    y = torch.where(flip, torch.randint(10, (n,), generator=gen), y)
    return x.clamp(-1, 1), y


def test_history_reports_epsilon_under_rdp_and_prv_for_the_same_steps(tmp_path, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = train(tiny_config(tmp_path, mode="dp", noise_multiplier=1.0,
                                       accountant="prv", epochs=2), data)
    record = trainer.run.history()[-1]
    history = [(1.0, record["sample_rate"], record["dp_steps"])]
    for name in ("rdp", "prv"):
        acc = create_accountant(name)
        acc.history = history
        assert record[f"epsilon_{name}"] == pytest.approx(acc.get_epsilon(record["delta"]), rel=1e-6)
    assert record["epsilon"] == record["epsilon_prv"] < record["epsilon_rdp"]


def test_downstream_epoch_is_chosen_on_generated_images_and_tested_once_on_real():
    train_x, train_y = blocks(600, seed=0)
    val_x, val_y = blocks(200, seed=1)
    test_x, test_y = blocks(300, seed=2)
    result = synthetic_to_real(train_x, train_y, val_x, val_y, test_x, test_y, epochs=3)
    curve = result["downstream_val_curve"]
    assert len(curve) == 3
    assert result["downstream_epoch"] == curve.index(max(curve)) + 1
    assert result["downstream_val_accuracy"] == max(curve)
    assert result["downstream_accuracy"] > 0.9
    # Real test labels that disagree with the images: the score drops, the choice does not
    # change, because the test split never takes part in it.
    shuffled = synthetic_to_real(train_x, train_y, val_x, val_y, test_x, test_y.roll(1), epochs=3)
    assert shuffled["downstream_epoch"] == result["downstream_epoch"]
    assert shuffled["downstream_val_curve"] == curve
    assert shuffled["downstream_accuracy"] < 0.3
    # The held-out cross-entropy of every epoch is reported; asking for every epoch's test
    # accuracy (to study the rule) changes neither the choice nor its score.
    losses = result["downstream_val_loss_curve"]
    assert len(losses) == 3 and all(0 < v < 2.31 for v in losses)  # below chance, ln 10
    studied = synthetic_to_real(train_x, train_y, val_x, val_y, test_x, test_y, epochs=3,
                                test_every_epoch=True)
    assert studied["downstream_epoch"] == result["downstream_epoch"]
    assert studied["downstream_val_loss_curve"] == losses
    assert studied["downstream_test_curve"][result["downstream_epoch"] - 1] == result["downstream_accuracy"]
    assert "downstream_test_curve" not in result


def test_cross_entropy_of_a_classifier_is_the_mean_negative_log_likelihood():
    from gankit.metrics.classifier import accuracy, accuracy_and_cross_entropy, build_classifier

    torch.manual_seed(0)
    net = build_classifier((1, 28, 28), 10).eval()
    x, y = blocks(50, seed=3)
    with torch.no_grad():
        want = -torch.log_softmax(net(x), dim=1)[torch.arange(50), y].mean().item()
    acc, loss = accuracy_and_cross_entropy(net, x, y, batch_size=16)
    assert loss == pytest.approx(want, rel=1e-5)
    assert acc == accuracy(net, x, y)


def test_dp_sgd_baseline_spends_its_budget_and_learns():
    from gankit.privacy import dp_sgd_classifier_accuracy

    train_x, train_y = blocks(2000, seed=0)
    test_x, test_y = blocks(500, seed=1)
    result = dp_sgd_classifier_accuracy(train_x, train_y, test_x, test_y, target_epsilon=4.0,
                                        delta=1e-4, epochs=4, batch_size=128, lr=0.5)
    assert 3.6 < result["epsilon"] <= 4.0
    assert result["accuracy"] > 0.9
    # A smaller budget means more noise for the same steps.
    small = dp_sgd_classifier_accuracy(train_x, train_y, test_x, test_y, target_epsilon=0.5,
                                       delta=1e-4, epochs=4, batch_size=128, lr=0.5)
    assert small["noise_multiplier"] > result["noise_multiplier"]


def test_an_exported_generator_holds_g_alone_with_what_the_run_protects_and_spent(tmp_path, data):
    from gankit.sampling import export_generator, load_generator
    from gankit.statefile import load_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = train(tiny_config(tmp_path, mode="dp", noise_multiplier=1.0, seed=5,
                                       conditional=True, ema_decay=0.9, epochs=1), data)
    path = export_generator(trainer.run.path, tmp_path / "released")
    state = load_state(path)
    assert not {"D", "d_opt", "g_opt", "rng", "ema", "mode"} & set(state)
    assert state["config"]["train"]["seed"] == 0  # the run's noise seed stays private
    last = trainer.run.history()[-1]
    assert state["spent"]["epsilon"] == last["epsilon"] and state["privacy"]["private"] is True
    released, original = load_generator(tmp_path / "released"), load_generator(trainer.run.path)
    assert released.privacy == original.privacy
    assert torch.equal(released.sample(8, seed=3)[0], original.sample(8, seed=3)[0])  # the EMA G


def test_the_dp_mnist_table_says_whether_its_curve_is_monotone_within_the_seeds_noise():
    import math

    import gankit.dp_mnist as dp_mnist

    def row(name, eps, acc, fid):
        return {"row": name, "epsilon": eps, "downstream_accuracy": acc, "fid": fid}

    table = [row("a1", 1.0, 0.80, 60), row("b1", 1.0, 0.84, 64), row("a4", 4.0, 0.83, 50),
             row("a10", 10.0, 0.88, 45), row("np", math.inf, 0.95, 10), row("other", 4.0, 0.1, 900)]
    curve = {"label": "r", "rows": ["a1", "b1", "a4", "a10", "np"]}
    note = dp_mnist.monotonicity(table, curve)
    # accuracy means 0.82, 0.83, 0.88, 0.95: monotone; FID means 62, 50, 45, 10: monotone
    assert "downstream_accuracy by epsilon (mean over seeds) 1: 0.82, 4: 0.83, 10: 0.88, inf: 0.95: monotone (" in note
    assert "fid by epsilon (mean over seeds) 1: 62, 4: 50, 10: 45, inf: 10: monotone (" in note
    table[2] = row("a4", 4.0, 0.80, 50)  # 0.02 below epsilon 1's mean, within its seeds' 0.04
    assert "monotone within the seeds' noise (largest step against the trend 0.02" in dp_mnist.monotonicity(table, curve)
    table[2] = row("a4", 4.0, 0.70, 50)
    assert "NOT monotone" in dp_mnist.monotonicity(table, curve)


def test_a_committed_private_row_gets_the_dp_sgd_baseline_at_its_own_epsilon(monkeypatch):
    """The baseline needs the row's privacy facts alone, so a row whose run folder is gone
    (a committed evaluation) gets it later; a non-private row or one that has it is left be."""
    import math
    from types import SimpleNamespace

    from gankit.privacy import dp_sgd_classifier_accuracy

    import gankit.dp_mnist as dp_mnist

    (train_x, train_y), (ref_x, ref_y) = blocks(600, seed=0), blocks(200, seed=1)
    data = SimpleNamespace(train_x=train_x, train_y=train_y, ref_x=ref_x, ref_y=ref_y)
    ev = {"baseline_epochs": 2}
    row = {"epsilon": 3.0, "delta": 1e-4}
    assert dp_mnist.add_baseline(row, data, ev, seed=4)
    want = dp_sgd_classifier_accuracy(train_x, train_y, ref_x, ref_y, target_epsilon=3.0, delta=1e-4,
                                      epochs=2, accountant="rdp", seed=4)
    assert row["dp_sgd_baseline_accuracy"] == want["accuracy"]
    assert row["dp_sgd_baseline_epsilon"] == want["epsilon"] <= 3.0
    assert not dp_mnist.add_baseline(row, data, ev, seed=4)  # already there: not trained again
    assert not dp_mnist.add_baseline({"epsilon": math.inf, "delta": 0}, data, ev, seed=4)

    # A target that gives the same noise with the same seed is the same training: reused, not
    # trained. Another seed is another training.
    trained = []
    monkeypatch.setattr(dp_mnist, "dp_sgd_classifier_accuracy",
                        lambda *a, **k: trained.append(k["seed"]) or {"accuracy": 0.5, "epsilon": 2.9})
    measured = [dict(row, seed=4, row="first")]
    near = {"epsilon": 3.0001, "delta": 1e-4}
    assert dp_mnist.add_baseline(near, data, ev, 4, measured) and not trained
    assert near["dp_sgd_baseline_noise"] == row["dp_sgd_baseline_noise"]  # (each noise search: seconds)
    assert near["dp_sgd_baseline_accuracy"] == want["accuracy"]
    assert near["dp_sgd_baseline_epsilon"] == want["epsilon"]
    for other_seed, other_eps in ((5, 3.0), (4, 2.5)):
        other = {"epsilon": other_eps, "delta": 1e-4}
        assert dp_mnist.add_baseline(other, data, ev, other_seed, measured)
        assert other["dp_sgd_baseline_accuracy"] == 0.5
    assert other["dp_sgd_baseline_noise"] != row["dp_sgd_baseline_noise"]
    assert trained == [5, 4]
