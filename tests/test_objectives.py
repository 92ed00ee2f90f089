"""Objectives against closed forms."""

import math

import pytest
import torch
from torch import nn

from gankit.objectives import OBJECTIVES, clip_weights, get_objective, gradient_penalty


@pytest.fixture(autouse=True)
def float64():
    # Closed forms are checked to 1e-9; restore the default so other test files see float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Two discrete distributions on five atoms.
P = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.15], dtype=torch.float64)
Q = torch.tensor([0.30, 0.25, 0.15, 0.20, 0.10], dtype=torch.float64)

# f and its derivative f' for each f-GAN (Nowozin et al. 2016, Table 1).
F_DIVERGENCES = {
    "kl": (lambda u: u * torch.log(u), lambda u: 1 + torch.log(u)),
    "rkl": (lambda u: -torch.log(u), lambda u: -1 / u),
    "pearson": (lambda u: (u - 1) ** 2, lambda u: 2 * (u - 1)),
    "hellinger": (lambda u: (torch.sqrt(u) - 1) ** 2, lambda u: 1 - 1 / torch.sqrt(u)),
    "js": (lambda u: -(u + 1) * torch.log((1 + u) / 2) + u * torch.log(u),
           lambda u: torch.log(2 * u / (1 + u))),
}


def invert(fn, target, lo=-60.0, hi=60.0, iters=200):
    """Bisection for the v with fn(v) = target (every output activation is increasing)."""
    lo, hi = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = fn(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def d_objective(obj, v_real, v_fake):
    """D's objective E_P[.] + E_Q[.] (to maximise) under the discrete P and Q."""
    return -(P * obj.d_real(v_real)).sum() - (Q * obj.d_fake(v_fake)).sum()


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
def test_fgan_bound_is_tight_at_optimal_critic(name):
    obj = get_objective(name)
    f, f_prime = F_DIVERGENCES[name]
    divergence = (Q * f(P / Q)).sum()
    v_opt = invert(obj.activation, f_prime(P / Q)).requires_grad_(True)
    value = d_objective(obj, v_opt, v_opt)
    assert value.item() == pytest.approx(divergence.item(), abs=1e-9)
    # The optimum is stationary: zero gradient with respect to every atom's score.
    (grad,) = torch.autograd.grad(value, v_opt)
    assert grad.abs().max().item() < 1e-8


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
def test_fgan_objective_is_a_lower_bound(name):
    obj = get_objective(name)
    f, _ = F_DIVERGENCES[name]
    divergence = (Q * f(P / Q)).sum().item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(5, generator=gen) * 2
        assert d_objective(obj, v, v).item() <= divergence + 1e-12


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
def test_fgan_threshold_is_optimal_critic_when_distributions_match(name):
    # With P = Q the optimal T is f'(1): exactly the decision threshold.
    obj = get_objective(name)
    _, f_prime = F_DIVERGENCES[name]
    assert obj.threshold == pytest.approx(f_prime(torch.tensor(1.0)).item())


def test_bce_at_optimal_discriminator_equals_jensen_shannon():
    # Goodfellow et al. 2014: at D* = p/(p+q) the D loss is log 4 - 2 JSD(P || Q).
    obj = get_objective("bce")
    v_opt = torch.log(P / Q)  # logit of p/(p+q)
    loss = (P * obj.d_real(v_opt)).sum() + (Q * obj.d_fake(v_opt)).sum()
    m = (P + Q) / 2
    jsd = 0.5 * (P * torch.log(P / m)).sum() + 0.5 * (Q * torch.log(Q / m)).sum()
    assert loss.item() == pytest.approx(math.log(4) - 2 * jsd.item(), abs=1e-12)


def test_bce_gradient_and_label_smoothing():
    obj = get_objective("bce")
    v = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    target = torch.full((3,), 0.9)
    loss = obj.d_real(v, target)
    s = torch.sigmoid(v)
    expected = -(0.9 * torch.log(s) + 0.1 * torch.log(1 - s))
    assert torch.allclose(loss, expected)
    (grad,) = torch.autograd.grad(loss.mean(), v)
    assert torch.allclose(grad, (s - 0.9) / 3)


def test_nonsaturating_generator_loss_keeps_gradient_when_d_is_confident():
    # When D rejects fakes with confidence (very negative logits), log(1 - D) saturates but
    # -log D keeps a gradient of about -1 per sample.
    obj = get_objective("bce")
    v = torch.tensor([-12.0], requires_grad=True)
    (g_nonsat,) = torch.autograd.grad(obj.g_loss(v).sum(), v)
    (g_minimax,) = torch.autograd.grad(obj.g_loss(v, minimax=True).sum(), v)
    assert g_nonsat.item() == pytest.approx(-1.0, abs=1e-4)
    assert abs(g_minimax.item()) < 1e-4


def test_wasserstein_critic_gradient_is_difference_of_masses():
    obj = get_objective("wgan")
    v = torch.zeros(5, requires_grad=True)
    loss = (P * obj.d_real(v)).sum() + (Q * obj.d_fake(v)).sum()
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.allclose(grad, Q - P)


def test_hinge_and_least_squares_values():
    hinge, ls = get_objective("hinge"), get_objective("lsgan")
    v = torch.tensor([-2.0, 0.5, 2.0])
    assert torch.allclose(hinge.d_real(v), torch.tensor([3.0, 0.5, 0.0]))
    assert torch.allclose(hinge.d_fake(v), torch.tensor([0.0, 1.5, 3.0]))
    # LSGAN's optimal D under targets a=0 (fake), b=1 (real) is p / (p + q): zero gradient.
    v_opt = (P / (P + Q)).requires_grad_(True)
    loss = (P * ls.d_real(v_opt)).sum() + (Q * ls.d_fake(v_opt)).sum()
    (grad,) = torch.autograd.grad(loss, v_opt)
    assert grad.abs().max().item() < 1e-12


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, y=None):
        return x.flatten(1) @ self.w + 0.7


def test_gradient_penalty_of_linear_critic():
    # A linear critic's input gradient is w everywhere: the penalty is (||w|| - 1)^2.
    w = torch.tensor([3.0, 4.0, 0.0, 12.0])  # ||w|| = 13
    critic = Linear(w.clone())
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(9, 1, 2, 2)
    gp = gradient_penalty(critic, real, fake)
    assert gp.shape == (6,)
    assert torch.allclose(gp, torch.full((6,), 144.0))
    # Its gradient with respect to w: 2 (||w|| - 1) w / ||w||, per sample.
    (grad,) = torch.autograd.grad(gp.mean(), critic.w)
    assert torch.allclose(grad, 2 * 12 * w / 13)


def test_weight_clipping_bounds_every_weight():
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1, 1)
    before = [p.clone() for p in net.parameters()]
    clip_weights(net, 0.01)
    for p, b in zip(net.parameters(), before):
        assert p.abs().max().item() <= 0.01
        inside = b.abs() <= 0.01
        assert torch.equal(p[inside], b[inside])


def test_every_registered_objective_decides_real_above_threshold():
    for name, obj in OBJECTIVES.items():
        v = torch.tensor([-30.0, 30.0])
        assert obj.says_real(v).tolist() == [False, True], name


def test_unknown_loss_names_choices():
    with pytest.raises(KeyError, match="choose from"):
        get_objective("nope")


def test_mode_seeking_penalty_is_latent_gap_over_image_gap():
    from gankit.steps import mode_seeking_penalty
    z_a, z_b = torch.zeros(3, 4), torch.full((3, 4), 2.0)         # latent gap 2
    fake_a, fake_b = torch.zeros(3, 1, 2, 2), torch.full((3, 1, 2, 2), 0.5)  # image gap 0.5
    assert mode_seeking_penalty(fake_a, fake_b, z_a, z_b).item() == pytest.approx(4.0, rel=1e-4)


def test_mode_seeking_term_spreads_a_generator_that_ignores_z(tmp_path):
    """D gives G no signal (a constant score), so only the term moves G: it must grow the
    weight through which z reaches the image, and leave G alone at weight 0."""
    from gankit.config import Config
    from gankit.latent import build_prior
    from gankit.steps import StepContext, generator_step

    class TinyG(nn.Module):
        def __init__(self):
            super().__init__()
            self.z_path = nn.Linear(4, 4, bias=False)
            nn.init.constant_(self.z_path.weight, 1e-3)

        def forward(self, z, labels):
            return self.z_path(z).view(-1, 1, 2, 2)

    class ConstantD(nn.Module):
        def forward(self, x, labels):
            return 0.0 * x.flatten(1).sum(1)

    spreads = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        config = Config().updated({"latent_dim": 4, "mode_seeking": weight})
        G, D = TinyG(), ConstantD()
        ctx = StepContext(G, build_prior(config.latent), get_objective("bce"), config, 0, torch.device("cpu"))
        g_opt = torch.optim.Adam(G.parameters(), lr=1e-2)
        stats = generator_step(ctx, D, g_opt, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0), 64)
        assert ("mode_seeking" in stats) == bool(weight)
        spreads[weight] = G.z_path.weight.abs().mean().item()
    assert spreads[0.0] == pytest.approx(1e-3)
    assert spreads[1.0] > 5e-3


def test_mode_seeking_pairs_share_their_mixture_component():
    """With a mixture prior, each mode-seeking pair comes from one component (so the term
    penalises a G that maps each component to one image); other latents are unchanged."""
    from gankit.latent import GaussianPrior, MixturePrior
    from gankit.steps import paired_latents

    prior = MixturePrior(8, components=10, sigma_init=1e-6)  # z is its component's mean
    torch.manual_seed(0)
    z = paired_latents(prior, 64, 20, "cpu")
    assert torch.allclose(z[:20], z[20:40], atol=1e-4)
    assert not torch.allclose(z[:10], z[10:20], atol=1e-4)  # the pairs' components vary
    torch.manual_seed(0)
    assert torch.equal(paired_latents(prior, 64, 0, "cpu"), (torch.manual_seed(0), prior.sample(64))[1])
    gaussian = GaussianPrior(8)
    torch.manual_seed(0)
    z = paired_latents(gaussian, 64, 20, "cpu")
    assert not torch.allclose(z[:20], z[20:40])  # a Gaussian pair is two independent draws


def test_auxiliary_classifier_teaches_g_the_labels_d_reads():
    """D's class head is fixed (class k = an image of mean (k - 4.5) / 5) and its score gives
    no signal, so only the class term moves G: G must learn one image level per label, and
    `g_class_acc` must say how often the head reads the label G was asked for."""
    from gankit.config import Config
    from gankit.latent import build_prior
    from gankit.steps import StepContext, generator_step

    class LabelG(nn.Module):
        def __init__(self):
            super().__init__()
            self.level = nn.Embedding(10, 1)
            nn.init.zeros_(self.level.weight)

        def forward(self, z, labels):
            return self.level(labels).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)

    centres = (torch.arange(10.0) - 4.5) / 5

    def fixed_d(x, labels, classes=False):
        mean = x.flatten(1).mean(1)
        logits = -20 * (mean[:, None] - centres[None]) ** 2
        score = 0.0 * mean
        return (score, logits) if classes else score

    torch.manual_seed(0)
    config = Config().updated({"latent_dim": 4, "conditional": True, "aux_classifier": 1.0})
    G = LabelG()
    ctx = StepContext(G, build_prior(config.latent), get_objective("bce"), config, 10, torch.device("cpu"))
    g_opt = torch.optim.Adam(G.parameters(), lr=0.05)
    no_d = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0)
    first = generator_step(ctx, fixed_d, g_opt, no_d, 256)
    for _ in range(150):
        last = generator_step(ctx, fixed_d, g_opt, no_d, 256)
    assert first["g_class_acc"] < 0.3
    assert last["g_class_acc"] == 1.0
    assert last["g_class_loss"] < first["g_class_loss"]
    # Inner labels settle on their centre; the outermost two may run on past it, where the
    # head is even more certain.
    assert torch.allclose(G.level.weight.squeeze(1)[1:-1], centres[1:-1], atol=0.05)


def test_auxiliary_classifier_d_stats_are_the_cross_entropy_on_real_labels(tmp_path):
    """`d_class_loss` is the mean cross-entropy of D's class head on the real batch, before
    the update, and D's loss is the adversarial loss plus weight x that."""
    from conftest import synthetic_data, tiny_config
    from gankit.latent import build_prior
    from gankit.models import build_discriminator, build_generator
    from gankit.steps import StepContext, discriminator_step

    torch.manual_seed(0)
    data = synthetic_data()
    config = tiny_config(tmp_path, conditional=True, aux_classifier=0.7, loss="hinge")
    G = build_generator(config.model, 16, data.image_shape, 10)
    D = build_discriminator(config.model, data.image_shape, 10, class_head=True)
    real, labels = data.train_x[:32], data.train_y[:32]
    with torch.no_grad():
        _, logits = D(real, labels, classes=True)
        want = nn.functional.cross_entropy(logits, labels)
    ctx = StepContext(G, build_prior(config.latent), get_objective("hinge"), config, 10, torch.device("cpu"))
    stats = discriminator_step(ctx, D, torch.optim.SGD(D.parameters(), lr=0.0), real, labels)
    assert stats["d_class_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["d_class_acc"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert stats["d_loss"].item() > 0.7 * want.item()


def test_auxiliary_classifier_needs_a_conditional_model_with_a_head():
    from gankit.config import Config, validate
    from gankit.errors import ConfigError
    for overrides, message in [({"aux_classifier": 1.0}, "--conditional"),
                               ({"aux_classifier": -1.0, "conditional": True}, r"--aux-classifier must be in \[0, 1e\+06\]"),
                               ({"aux_classifier": 1.0, "conditional": True, "d_arch": "cdcgan",
                                 "g_arch": "cdcgan", "d_norm": "none", "g_norm": "none"}, "output head")]:
        with pytest.raises(ConfigError, match=message):
            validate(Config().updated(overrides), 10)
