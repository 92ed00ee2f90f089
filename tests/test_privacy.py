"""The dp mode: pairing, clipping and noise, accounting, budget stop, resume, refusals, CLI."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import StopAt, assert_same_weights, history, tiny_config, train
from gankit import cli
from gankit.config import GRAD_SAMPLE_MODES, validate
from gankit.errors import ConfigError
from gankit.models import build_discriminator
from gankit.runs import RunDir
from gankit.trainer import Trainer, unwrapped

opacus = pytest.importorskip("opacus")
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from gankit.privacy import PoissonBatches, module_problems, resolve_delta  # noqa: E402

REAL_DATA_STATS = ("d_loss", "d_real", "d_fake", "d_acc_real", "d_acc_fake")


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' advice on secure RNG and full backward hooks
        yield


def dp_config(out_dir, **overrides):
    return tiny_config(out_dir, **{"mode": "dp", **overrides})


class CaptureSteps:
    """Records D's input batches and the gradient the private optimizer hands to Adam."""

    def __init__(self, trainer):
        self.inputs, self.labels, self.grads, self.fakes = [], [], [], []
        opt = trainer.d_opt.original_optimizer
        step = opt.step

        def capturing_step(*args, **kwargs):
            self.grads.append([p.grad.detach().clone() for p in trainer.d_opt.params])
            return step(*args, **kwargs)

        opt.step = capturing_step
        def record(module, args):
            self.inputs.append(args[0].detach().clone())
            self.labels.append(args[1] if len(args) > 1 else None)

        unwrapped(trainer.D).register_forward_pre_hook(record)
        trainer.G.register_forward_hook(
            lambda module, args, out: self.fakes.append(out.detach().clone()))


def pair_gradient(D, objective, real, fake):
    """The gradient of one (real, fake) pair's loss, computed alone."""
    loss = objective.d_real(D(real[None])).sum() + objective.d_fake(D(fake[None])).sum()
    return torch.autograd.grad(loss, list(D.parameters()))


# --- pairing, clipping, noise --------------------------------------------------------------------

@pytest.mark.parametrize("grad_sample_mode,physical", [(m, 0) for m in GRAD_SAMPLE_MODES]
                         + [("ew", 7), ("hooks", 7), ("bk", 7)])
def test_private_gradient_is_mean_of_clipped_pair_gradients(tmp_path, data, grad_sample_mode,
                                                            physical):
    """With the noise off, the gradient Adam receives is sum_i clip(grad(real_i + fake_i)) / B:
    Opacus sums the two passes' per-sample gradients index by index (real i with fake i), clips
    each pair to max_grad_norm, and physical batches add up to the same logical step."""
    config = dp_config(tmp_path, grad_sample_mode=grad_sample_mode, physical_batch_size=physical,
                       max_grad_norm=0.05, loss="hinge", epochs=1)
    trainer = Trainer(config, data, RunDir.create(config))
    trainer.d_opt.noise_multiplier = 0.0
    D0 = build_discriminator(config.model, data.image_shape, 0)  # a plain copy: no Opacus hooks
    D0.load_state_dict(unwrapped(trainer.D).state_dict())
    capture = CaptureSteps(trainer)
    real, _ = next(trainer.batches.epoch(0))
    trainer.d_step(trainer.ctx, trainer.D, trainer.d_opt, real, None, False)
    assert len(capture.grads) == 1  # one optimizer step for the logical batch
    chunk = physical or len(real)
    assert all(len(x) <= chunk for x in capture.inputs)
    reals = [x for i, x in enumerate(capture.inputs) if i % 2 == 0]
    assert torch.equal(torch.cat(reals), real)
    fakes = torch.cat(capture.fakes)
    expected = [torch.zeros_like(p) for p in D0.parameters()]
    clipped_any = False
    for r, f in zip(real, fakes):
        g = pair_gradient(D0, trainer.objective, r, f)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        factor = min(1.0, 0.05 / (float(norm) + 1e-6))
        clipped_any |= factor < 1
        assert norm * factor <= 0.05 * (1 + 1e-5)
        for e, t in zip(expected, g):
            e += factor * t
    assert clipped_any
    B = trainer.d_opt.expected_batch_size
    assert B == 32
    for got, want in zip(capture.grads[0], expected):
        assert torch.allclose(got, want / B, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("grad_sample_mode", ["bk", "hooks"])
def test_auxiliary_classifier_loss_is_clipped_with_its_real_example(tmp_path, data,
                                                                    grad_sample_mode):
    """--aux-classifier under DP: the class loss on real example i is part of pair i's loss,
    so the private gradient is sum_i clip(grad(d_real_i + w CE_i + d_fake_i)) / B."""
    config = dp_config(tmp_path, grad_sample_mode=grad_sample_mode, max_grad_norm=0.05,
                       loss="hinge", epochs=1, conditional=True, aux_classifier=0.5)
    trainer = Trainer(config, data, RunDir.create(config))
    trainer.d_opt.noise_multiplier = 0.0
    D0 = build_discriminator(config.model, data.image_shape, 10, class_head=True)
    D0.load_state_dict(unwrapped(trainer.D).state_dict())
    capture = CaptureSteps(trainer)
    real, labels = next(trainer.batches.epoch(0))
    trainer.d_step(trainer.ctx, trainer.D, trainer.d_opt, real, labels, False)
    fakes, fake_labels = torch.cat(capture.fakes), capture.labels[1]
    obj = trainer.objective
    expected = [torch.zeros_like(p) for p in D0.parameters()]
    for r, y, f, yf in zip(real, labels, fakes, fake_labels):
        score, logits = D0(r[None], y[None], classes=True)
        loss = (obj.d_real(score).sum() + 0.5 * torch.nn.functional.cross_entropy(logits, y[None])
                + obj.d_fake(D0(f[None], yf[None])).sum())
        g = torch.autograd.grad(loss, list(D0.parameters()))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        factor = min(1.0, 0.05 / (float(norm) + 1e-6))
        for e, t in zip(expected, g):
            e += factor * t / trainer.d_opt.expected_batch_size
    assert any(float(e.abs().sum()) > 0 for e in expected[-2:])  # the class head learns
    for got, want in zip(capture.grads[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_noise_has_std_noise_multiplier_times_clip_over_expected_batch(tmp_path, data):
    config = dp_config(tmp_path, noise_multiplier=1.3, max_grad_norm=0.7)
    trainer = Trainer(config, data, RunDir.create(config))
    capture = CaptureSteps(trainer)
    steps = trainer.mode.steps()
    for _ in range(10):  # zero data gradient: an empty Poisson batch makes a noise-only step
        trainer.d_step(trainer.ctx, trainer.D, trainer.d_opt, data.train_x[:0], None, False)
    noise = torch.cat([g.flatten() for grads in capture.grads for g in grads])
    assert noise.numel() > 20_000
    expected = 1.3 * 0.7 / 32
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.numel())
    assert abs(noise.std() / expected - 1) < 0.03
    assert trainer.mode.steps() == steps + 10  # the accountant counts empty steps


# --- accounting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_accountant(tmp_path, data, accountant):
    config = dp_config(tmp_path, accountant=accountant, noise_multiplier=0.8, epochs=2)
    trainer, status = train(config, data)
    assert status == "done"
    records = trainer.run.history()
    last = records[-1]
    assert last["accountant"] == accountant and last["sample_rate"] == 1 / 8
    assert [r["dp_steps"] for r in records] == [8, 16]
    assert last["delta"] == 1e-5 and last["noise_multiplier"] == 0.8
    independent = create_accountant(accountant)
    for _ in range(16):
        independent.step(noise_multiplier=0.8, sample_rate=1 / 8)
    assert last["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert records[0]["epsilon"] < last["epsilon"]
    for key in REAL_DATA_STATS:  # not private: kept out of history and checkpoints
        assert all(key not in r for r in records)
    assert "g_loss" in last and "d_grad_norm" in last
    assert not any(k in REAL_DATA_STATS for k in trainer.run.load_checkpoint()["state"]["sums"])


def test_default_delta_rule():
    assert resolve_delta(0.0, 60_000) == 1e-5
    assert resolve_delta(0.0, 100_000) == pytest.approx(1e-6)  # 1e-5 is not below 1/N
    assert resolve_delta(0.0, 200_000) == pytest.approx(5e-7)
    assert resolve_delta(3e-7, 60_000) == 3e-7


def test_target_epsilon_run_ends_below_it_and_an_extension_stops_at_the_budget(tmp_path, data):
    config = dp_config(tmp_path, target_epsilon=4.0, accountant="rdp", epochs=2)
    trainer, status = train(config, data)
    sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=1 / 8,
                                 epochs=2, accountant="rdp")
    last = trainer.run.history()[-1]
    assert status == "done" and last["noise_multiplier"] == sigma
    assert last["epsilon"] <= 4.0 and last["target_epsilon"] == 4.0
    # More epochs than planned: the run keeps its noise and stops before passing the target.
    longer, status = train(config.updated({"epochs": 4}), data, resume=True)
    assert status == "stopped" and longer.state.epoch == 2
    assert "target 4" in longer.mode.stop_reason(len(longer.batches))
    assert longer.mode.epoch_metrics()["epsilon"] == last["epsilon"]
    assert longer.d_opt.noise_multiplier == sigma


# --- resume --------------------------------------------------------------------------------------

def test_resume_after_an_epoch_continues_the_accounting_exactly(tmp_path, data):
    options = dict(conditional=True, n_critic=2)
    straight, _ = train(dp_config(tmp_path / "s", epochs=2, **options), data)
    first, _ = train(dp_config(tmp_path / "r", epochs=1, **options), data)
    resumed, _ = train(first.config.updated({"epochs": 2}), data, resume=True)
    assert history(straight) == history(resumed)  # epsilon neither reset nor counted twice
    assert resumed.mode.steps() == 16
    assert_same_weights(straight, resumed)


def test_interrupt_mid_epoch_and_resume_continue_the_same_accounting(tmp_path, data):
    options = dict(grad_sample_mode="ew", physical_batch_size=16, loss="wgan",
                   d_dropout=0.2, instance_noise=0.1)
    straight, _ = train(dp_config(tmp_path / "s", **options), data)
    cut, status = train(dp_config(tmp_path / "r", **options), data, callbacks=[StopAt(11)])
    assert status == "interrupted" and cut.mode.steps() == 11
    assert cut.run.load_checkpoint()["mode"]["accountant"]["history"][0][2] == 11
    resumed, status = train(cut.config, data, resume=True)
    assert status == "done" and resumed.mode.steps() == 16
    assert history(straight) == history(resumed)
    assert_same_weights(straight, resumed)


def test_poisson_batches_vary_and_each_epoch_is_reproducible():
    x = torch.arange(1000).float()[:, None]
    batches = PoissonBatches(x, None, 0.05, 20, seed=3)
    epoch = [b for b, _ in batches.epoch(4)]
    sizes = [len(b) for b in epoch]
    assert len(epoch) == len(batches) == 20 and len(set(sizes)) > 5
    assert abs(sum(sizes) / 20 - 50) < 10
    resumed = [b for b, _ in batches.epoch(4, start=7)]
    assert all(torch.equal(a, b) for a, b in zip(epoch[7:], resumed)) and len(resumed) == 13
    assert not torch.equal(epoch[0], next(batches.epoch(5))[0])


# --- refusals and the command line ---------------------------------------------------------------

def test_unsupported_options_are_refused_together(tmp_path):
    config = dp_config(tmp_path, d_norm="batch", spectral_norm=True, loss="wgan-gp",
                       secure_mode=True)
    with pytest.raises(ConfigError) as err:
        validate(config)
    problems = err.value.problems
    assert len(problems) == 4
    for option, reason in [("--d-norm batch", "mixes samples"), ("--spectral-norm", "parametriz"),
                           ("--loss wgan-gp", "differentiates D twice"),
                           ("--secure-mode", "torchcsprng")]:
        assert any(option in p and reason in p and "use" in p for p in problems), option
    validate(tiny_config(tmp_path, d_norm="batch", spectral_norm=True))  # standard mode: fine


def test_opacus_module_validator_runs_on_the_discriminator():
    cfg = tiny_config("unused", d_norm="batch").model
    problems = module_problems(build_discriminator(cfg, (1, 28, 28), 0))
    assert problems and all("BatchNorm" in p for p in problems)
    assert module_problems(build_discriminator(tiny_config("unused").model, (1, 28, 28), 0)) == []


def test_cli_trains_in_dp_mode(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 200))
    code = cli.main(["train", "--mode", "dp", "--dataset", f"npz:{tmp_path / 'digits.npz'}",
                     "--g-width", "8", "--d-width", "8", "--latent-dim", "8", "--batch-size",
                     "32", "--epochs", "1", "--no-progress", "--no-tensorboard",
                     "--eval-every", "0", "--out-dir", str(tmp_path), "--name", "dp",
                     "--accountant", "rdp"])
    assert code == 0
    lines = (tmp_path / "dp" / "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[-1]["epsilon"] > 0 and records[-1]["accountant"] == "rdp"
    assert "d_loss" not in records[-1]
    code = cli.main(["train", "--mode", "dp", "--d-norm", "batch", "--out-dir", str(tmp_path)])
    assert code == 2 and "mixes samples" in capsys.readouterr().err


@pytest.mark.parametrize("physical", [0, 7])
def test_public_fake_gradients_are_exact_and_only_real_examples_are_clipped(tmp_path, data,
                                                                           physical):
    """--fake-gradients public: sum_i clip(grad real_i) / B + the exact mean gradient over
    the fakes (they read no private data); physical chunks add up to the same step."""
    config = dp_config(tmp_path, grad_sample_mode="bk", fake_gradients="public",
                       physical_batch_size=physical, max_grad_norm=0.05, loss="hinge", epochs=1)
    trainer = Trainer(config, data, RunDir.create(config))
    trainer.d_opt.noise_multiplier = 0.0
    D0 = build_discriminator(config.model, data.image_shape, 0)
    D0.load_state_dict(unwrapped(trainer.D).state_dict())
    capture = CaptureSteps(trainer)
    real, _ = next(trainer.batches.epoch(0))
    trainer.d_step(trainer.ctx, trainer.D, trainer.d_opt, real, None, False)
    fakes = torch.cat(capture.fakes)
    obj = trainer.objective
    expected = [torch.zeros_like(p) for p in D0.parameters()]
    for r in real:
        g = torch.autograd.grad(obj.d_real(D0(r[None])).sum(), list(D0.parameters()))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        factor = min(1.0, 0.05 / (float(norm) + 1e-6))
        for e, t in zip(expected, g):
            e += factor * t / trainer.d_opt.expected_batch_size
    fake_grad = torch.autograd.grad(obj.d_fake(D0(fakes)).mean(), list(D0.parameters()))
    for got, want, exact in zip(capture.grads[0], expected, fake_grad):
        assert torch.allclose(got, want + exact, rtol=1e-4, atol=1e-7)
    # The fakes' part is not clipped: it is larger than any clipped contribution could be.
    assert max(float(t.abs().max()) for t in fake_grad) > 0.05 / trainer.d_opt.expected_batch_size


def test_noise_search_hides_only_the_warnings_about_its_probes():
    """The bisection's low-noise probes make Opacus warn "Optimal order is the largest alpha";
    the answer is found without any warning reaching the user."""
    from gankit.privacy import _noise_for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = _noise_for(10.0, 1e-5, 0.01695, 887, "rdp")
    assert 0.6 < sigma < 0.7


def test_prv_epsilon_hides_the_warning_about_its_internal_rdp_domain_bound():
    """PRV sizes its domain with an RDP bound at delta/4000, whose best order is the largest
    for the epsilon-1 recipe (noise 4.18, 3,540 steps); that warning is not about the PRV
    epsilon, while the RDP epsilon of the same history (best order 18) warns about nothing."""
    from gankit.privacy import epsilon_of
    history = [(4.1796875, 1 / 59, 3540)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epsilon_of(history, 1e-5, "prv") == pytest.approx(0.922, abs=0.002)
        assert epsilon_of(history, 1e-5, "rdp") == pytest.approx(0.998, abs=0.001)
    # After one epoch the RDP bound itself is at the largest order: the user is told.
    with pytest.warns(UserWarning, match="Optimal order is the largest alpha"):
        epsilon_of([(4.1796875, 1 / 59, 59)], 1e-5, "rdp")
