"""Discriminator rejection sampling: known answers on toys where the density ratio is exact."""

import math

import pytest
import torch

from conftest import synthetic_data, tiny_config
from gankit.errors import UserError
from gankit.models import build_discriminator, build_generator
from gankit.latent import build_prior
from gankit.objectives import OBJECTIVES
from gankit.rejection_sampling import (DENSITY_RATIO_LOGITS, AcceptanceTooLow, Calibration,
                                        RejectionSampler, acceptance_score, fit_calibration,
                                        rejection_sampler_for)
from gankit.runs import RunDir
from gankit.sampling import LoadedGenerator, load_discriminator, load_generator
from gankit.trainer import Trainer

# A discrete toy: the proposal q (the "generator") and the target p over five atoms.
Q = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
P = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3], dtype=torch.float64)
LOG_RATIO = (P / Q).log()


def atom_generator(probs, seed=0):
    rng = torch.Generator().manual_seed(seed)

    def generate(n):
        return torch.multinomial(probs, n, replacement=True, generator=rng).float(), None
    return generate


def exact_logits(atoms, labels):
    return LOG_RATIO[atoms.long()]


def logit_stream(sample_logits, seed=0):
    """A 'generator' whose samples are their own logits, drawn by sample_logits(n, rng)."""
    rng = torch.Generator().manual_seed(seed)
    return lambda n: (sample_logits(n, rng), None)


def identity_score(images, labels):
    return images


def test_gamma_zero_is_classic_rejection_sampling():
    logits = torch.linspace(-8, 0, 50, dtype=torch.float64)
    probability = torch.sigmoid(acceptance_score(logits, 0.0))
    assert torch.allclose(probability, logits.exp(), rtol=1e-5, atol=1e-9)


def test_exact_logits_turn_proposal_into_target():
    sampler = RejectionSampler(atom_generator(Q), exact_logits, burn_in=2000, batch_size=5000,
                               seed=1)
    atoms, labels, stats = sampler.sample(20_000, max_draws=200_000)
    assert labels is None and atoms.shape == (20_000,)
    histogram = torch.bincount(atoms.long(), minlength=5).double() / atoms.numel()
    assert 0.5 * (histogram - P).abs().sum() < 0.02
    # A rate of 1 / M with M = max p / q = 3, as for classic rejection sampling.
    assert sampler.max_logit == pytest.approx(math.log(3.0))
    assert stats.acceptance_rate == pytest.approx(1 / 3, abs=0.01)
    assert stats.draws >= 50_000 and stats.uses_real_data is False
    # Without rejection the proposal is far from the target.
    draws = atom_generator(Q, seed=2)(20_000)[0]
    proposal = torch.bincount(draws.long(), minlength=5).double() / draws.numel()
    assert 0.5 * (proposal - P).abs().sum() > 0.25


def test_same_seed_same_samples():
    def run(seed):
        sampler = RejectionSampler(atom_generator(Q, seed), exact_logits, burn_in=500, seed=seed)
        return sampler.sample(300)[0]
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_target_acceptance_rate_is_met():
    # Logits uniform on [-3, 0]: the burn-in sees essentially the true maximum.
    generate = logit_stream(lambda n, rng: -3 * torch.rand(n, generator=rng))
    sampler = RejectionSampler(generate, identity_score, target_acceptance=0.2, burn_in=20_000)
    sampler.fit()
    assert sampler.expected_acceptance == pytest.approx(0.2, abs=1e-6)
    _, _, stats = sampler.sample(10_000)
    assert stats.acceptance_rate == pytest.approx(0.2, abs=0.01)
    assert stats.gamma == sampler.gamma


def test_gamma_percentile_is_the_percentile_of_burn_in_scores():
    seen = []
    generate = logit_stream(lambda n, rng: seen.append(torch.randn(n, generator=rng)) or seen[-1])
    sampler = RejectionSampler(generate, identity_score, gamma_percentile=80, burn_in=4000).fit()
    burn_in = torch.cat(seen).double()
    scores = acceptance_score(burn_in, burn_in.max().item())
    assert sampler.gamma == pytest.approx(torch.quantile(scores, 0.8).item())
    # A fifth of the burn-in has F >= gamma, i.e. acceptance probability >= 1/2.
    probability = sampler.acceptance_probability(burn_in)
    assert (probability >= 0.5).double().mean().item() == pytest.approx(0.2, abs=1e-3)


def test_higher_gamma_accepts_less():
    rates = []
    for percentile in (50, 80, 95):
        generate = logit_stream(lambda n, rng: torch.randn(n, generator=rng))
        sampler = RejectionSampler(generate, identity_score, gamma_percentile=percentile,
                                   burn_in=2000)
        rates.append(sampler.sample(500)[2].acceptance_rate)
    assert rates[0] > rates[1] > rates[2]


def test_max_logit_rises_when_a_larger_logit_appears():
    calls = []

    def generate(n):
        calls.append(n)
        logits = torch.full((n,), -1.0)
        logits[0] = 0.0
        if len(calls) == 3:  # after the burn-in (two batches), one batch holds a larger logit
            logits[1] = 5.0
        return logits, None

    sampler = RejectionSampler(generate, identity_score, burn_in=20, batch_size=10)
    images, _, stats = sampler.sample(1, max_draws=1000)
    assert stats.burn_in_max_logit == 0.0
    assert stats.max_logit == sampler.max_logit == 5.0
    # The new maximum is accepted with probability ~1; logit 0 is now 5 below it.
    probabilities = sampler.acceptance_probability(torch.tensor([5.0, 0.0], dtype=torch.float64))
    assert probabilities[0] > 0.999
    assert probabilities[1].item() == pytest.approx(math.exp(-5.0), rel=1e-4)


def test_running_out_of_draws_raises_a_clear_error():
    generate = logit_stream(lambda n, rng: torch.randn(n, generator=rng))
    sampler = RejectionSampler(generate, identity_score, gamma=30.0, burn_in=100)
    message = "accepted only 0 of 50 samples in 2000 draws"
    with pytest.raises(AcceptanceTooLow, match=message) as err:
        sampler.sample(50, max_draws=2000)
    assert isinstance(err.value, UserError)
    assert err.value.stats.draws == 2000 and err.value.stats.accepted == 0


def test_labels_follow_their_samples():
    rng = torch.Generator().manual_seed(0)

    def generate(n):
        labels = torch.randint(3, (n,), generator=rng)
        return labels.float()[:, None].repeat(1, 2), labels

    sampler = RejectionSampler(generate, lambda x, y: -y.double(), burn_in=300)
    images, labels, stats = sampler.sample(20_000)  # class 2's ratio then has std 0.004
    assert torch.equal(images[:, 0].long(), labels)
    # Logit -label: class c is kept with probability exp(-c).
    counts = torch.bincount(labels, minlength=3).double()
    assert (counts / counts[0]).tolist() == pytest.approx([1, math.exp(-1), math.exp(-2)],
                                                          abs=0.03)


def test_invalid_options_are_user_errors():
    generate, score = logit_stream(lambda n, rng: torch.randn(n, generator=rng)), identity_score
    for options in (dict(gamma=1.0, target_acceptance=0.2), dict(gamma_percentile=101),
                    dict(target_acceptance=1.0), dict(eps=0.0), dict(burn_in=0)):
        with pytest.raises(UserError):
            RejectionSampler(generate, score, **options)
    nan = RejectionSampler(lambda n: (torch.full((n,), math.nan), None), score, burn_in=10)
    with pytest.raises(UserError, match="NaN"):
        nan.fit()


# --- calibration -----------------------------------------------------------------------------

def two_gaussian_scores(n_real, n_fake, seed=0):
    """Real t ~ N(1, 1), generated t ~ N(-1, 1): log p_data / p_g = 2t exactly.

    D's raw score is v = (logit - 2) / 3, so the calibrated logit is 3 v + 2."""
    rng = torch.Generator().manual_seed(seed)
    real_t = torch.randn(n_real, generator=rng, dtype=torch.float64) + 1
    fake_t = torch.randn(n_fake, generator=rng, dtype=torch.float64) - 1
    return (2 * real_t - 2) / 3, (2 * fake_t - 2) / 3


@pytest.mark.parametrize("n_real, n_fake", [(20_000, 20_000), (10_000, 40_000)])
def test_calibration_recovers_a_known_affine_map(n_real, n_fake):
    # Unequal counts must not shift b (an unweighted fit would give b = 2 + log(n_real/n_fake)).
    # Over seeds the estimates scatter by about 0.05.
    calibration = fit_calibration(*two_gaussian_scores(n_real, n_fake))
    assert calibration.a == pytest.approx(3.0, abs=0.15)
    assert calibration.b == pytest.approx(2.0, abs=0.15)
    assert (calibration.n_real, calibration.n_fake) == (n_real, n_fake)
    assert calibration.uses_real_data
    assert calibration(torch.tensor([0.0, 1.0])).tolist() == pytest.approx(
        [calibration.b, calibration.a + calibration.b])


def test_calibrated_sampler_uses_real_data_and_finds_the_target():
    real, fake = two_gaussian_scores(20_000, 20_000)
    calibration = fit_calibration(real, fake)
    # Generated t ~ N(-1, 1), shown to the sampler as raw scores; DRS should shift it
    # towards N(1, 1). The ratio is unbounded, so cap t at 2 to keep the maximum finite.
    rng = torch.Generator().manual_seed(3)

    def generate(n):
        t = (torch.randn(n, generator=rng, dtype=torch.float64) - 1).clamp(max=2.0)
        return t, None

    sampler = RejectionSampler(generate, lambda t, y: (2 * t - 2) / 3, calibration=calibration,
                               burn_in=5000)
    t, _, stats = sampler.sample(3000, max_draws=10**6)
    assert sampler.uses_real_data and stats.uses_real_data
    # q(t) e^(2t) is the N(1, 1) density, so below the cap accepted t follow N(1, 1) (mass
    # Phi(1) = 0.841), and the cap adds an atom at 2 of mass P(Z > 3) e^4 = 0.074: mean
    # (Phi(1) - phi(1) + 2 * 0.074) / 0.915 = 0.816, acceptance rate 0.915 / e^4 = 0.0168
    # (D~* = 4 at the cap). Loose tolerances: the fitted a, b are only close to 3, 2.
    assert t.mean().item() == pytest.approx(0.816, abs=0.1)
    assert stats.acceptance_rate == pytest.approx(0.0168, rel=0.15)


def test_separable_scores_give_a_finite_calibration():
    calibration = fit_calibration(torch.linspace(1, 2, 100), torch.linspace(-2, -1, 100))
    assert math.isfinite(calibration.a) and calibration.a > 0
    with pytest.warns(UserWarning, match="does not rank real samples above"):
        fit_calibration(torch.linspace(-2, -1, 100), torch.linspace(1, 2, 100))


def test_constant_scores_cannot_be_calibrated():
    with pytest.raises(UserError, match="same score"):
        fit_calibration(torch.zeros(10), torch.zeros(10))


# --- closed-form logits ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DENSITY_RATIO_LOGITS))
def test_closed_form_logit_at_the_optimal_discriminator(name):
    # On each atom the optimal raw output v minimises p * d_real(v) + q * d_fake(v);
    # the closed form must turn it into log(p / q).
    objective = OBJECTIVES[name]
    v = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (P * objective.d_real(v) + Q * objective.d_fake(v)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(DENSITY_RATIO_LOGITS[name](v.detach()), LOG_RATIO, atol=1e-5)


# --- wiring to models ------------------------------------------------------------------------

def tiny_models(tmp_path, conditional=False, loss="bce"):
    config = tiny_config(tmp_path, conditional=conditional, loss=loss)
    shape, classes = (1, 28, 28), (10 if conditional else 0)
    G = build_generator(config.model, config.latent.latent_dim, shape, classes)
    D = build_discriminator(config.model, shape, classes)
    loaded = LoadedGenerator(G.eval(), build_prior(config.latent).eval(), config, classes, shape)
    return loaded, D


def test_sampler_for_a_conditional_bce_model(tmp_path):
    loaded, D = tiny_models(tmp_path, conditional=True)
    D.train()
    sampler = rejection_sampler_for(loaded, D, "bce", burn_in=64, batch_size=32,
                                    target_acceptance=0.5)
    images, labels, stats = sampler.sample(20)
    assert images.shape == (20, 1, 28, 28) and labels.shape == (20,)
    assert not stats.uses_real_data and D.training  # D's mode is restored
    fixed = rejection_sampler_for(loaded, D, "bce", label=3, burn_in=32, batch_size=32)
    assert (fixed.sample(5)[1] == 3).all()


@pytest.mark.filterwarnings("ignore:calibrated slope")  # an untrained critic ranks at random
def test_critic_needs_a_calibration_on_real_data(tmp_path):
    loaded, D = tiny_models(tmp_path, loss="wgan")
    with pytest.raises(UserError, match="needs real images"):
        rejection_sampler_for(loaded, D, "wgan")
    with pytest.raises(UserError, match="not density-ratio logits"):
        rejection_sampler_for(loaded, D, "hinge", calibrate=False)
    real = synthetic_data(n=64, labelled=False).train_x
    sampler = rejection_sampler_for(loaded, D, "wgan", real_images=real, burn_in=32,
                                    batch_size=32)
    assert isinstance(sampler.calibration, Calibration) and sampler.uses_real_data
    assert sampler.calibration.n_real == sampler.calibration.n_fake == 64
    # A closed-form objective calibrates only when asked.
    assert not rejection_sampler_for(loaded, D, "js", real_images=real).uses_real_data
    assert rejection_sampler_for(loaded, D, "bce", real_images=real, calibrate=True,
                                 batch_size=32).uses_real_data


def test_sampler_for_a_trained_run(tmp_path):
    config = tiny_config(tmp_path, epochs=1, conditional=True)
    Trainer(config, synthetic_data(n=64), RunDir.create(config)).fit()
    run = tmp_path / "run"
    D = load_discriminator(run)
    sampler = rejection_sampler_for(load_generator(run), D, config.objective.loss, burn_in=32,
                                    batch_size=32)
    assert sampler.sample(4)[0].shape == (4, 1, 28, 28)
