"""The dp mode: differentially private GAN training with Opacus (DP-SGD on the discriminator).

Only the discriminator touches real data, so only D is made private. Opacus wraps D (per-sample
gradients), D's optimizer (each real example's gradient clipped to `max_grad_norm`, Gaussian
noise of std `noise_multiplier * max_grad_norm` added to the sum) and the sampling of real
batches (Poisson). The generator learns only from D's scores of generated images: its weights
and samples are post-processing of the private D and carry D's (epsilon, delta) guarantee.

Pairing. A D step runs D on n real images and on n fresh fakes and backpropagates
mean(real terms) + mean(fake terms) once. Opacus adds the per-sample gradients of the two
passes index by index (hooks and functorch: `create_or_accumulate_grad_sample` sums into
`_current_grad_sample[:n]` until every forward of the step is matched; ew: torch's
`set_grad_sample_if_exists` adds each pass's contribution), so per-sample gradient i is the
gradient of the pair (real i, fake i), and clipping bounds each real example's whole
contribution. The fake images depend on no real data, so the sensitivity stays one clipped
gradient. (hooks pops stored activations last-in first-out, which matches because autograd
runs the later fake pass's backward first; a mismatch would be silent, so
tests/test_privacy.py checks the sum against a pair-at-a-time loop in every mode.) Hooks are
on only inside the D step, so G's pass through D costs what it costs without Opacus.

Batches. Poisson sampling (Opacus' UniformWithReplacementSampler: every example joins a step
with probability q = 1/ceil(N/B), 1/q steps an epoch) with the sampler's generator seeded from
(seed, epoch), so a resumed run redraws the same batches and skips the ones done. An empty
batch still makes a (noise-only) step, as Opacus does, so the accounting stays true.

Statistics. d_loss, D(real) and the real/fake accuracies are functions of the raw real batch
(or of its size, which Poisson sampling makes data-dependent), not of the noised gradient, so
the dp mode's D step drops them: history, TensorBoard, callbacks and checkpoints only see
private values (D's gradient norm after noising, G's loss and gradient norm, epsilon).

Randomness. Like Opacus without `secure_mode`, sampling and noise come from seeded
pseudo-random generators (runs are reproducible and resume exactly). The guarantee assumes
the adversary does not know that randomness: keep the seed, config.json and checkpoints of a
released model private, and pick an unguessable --seed for a release.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import warnings
from typing import Iterator, Optional

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gankit.clipping import BookKeepingClipper, BookKeepingOptimizer, unsupported_layers
from gankit.config import Config, dp_problems
from gankit.errors import ConfigError, UserError
from gankit.modes import DiscriminatorParts
from gankit.objectives import clip_weights
from gankit.steps import grad_norm

log = logging.getLogger(__name__)

# The only D-step statistic computed from the privatized gradient; every other one reads the
# real batch (d_loss, d_real, d_acc_real) or is averaged over its data-dependent size
# (d_fake, d_acc_fake).
PRIVATE_D_STATS = ("d_grad_norm",)


def resolve_delta(delta: float, n: int) -> float:
    """The configured delta, or 1e-5, or 1/(10 N) where 1e-5 is not below 1/N.

    A delta of 1/N or more is no guarantee: a mechanism that publishes one random record
    in the clear meets (0, 1/N)-DP. It is refused."""
    if delta:
        if delta >= 1.0 / n:
            raise ConfigError(f"dp: --delta {delta:g} is not below 1/N = 1/{n:,} = {1 / n:.3g}: "
                              "such a delta allows publishing a record in the clear; use a "
                              f"delta well below 1/N (e.g. {1 / (10 * n):.1g}, or 0 for the default)")
        return delta
    return 1e-5 if 1e-5 < 1.0 / n else 1.0 / (10 * n)


def sample_rate_of(n: int, batch_size: int, poisson: bool) -> float:
    """Opacus' sample rate for N examples in batches of B: one over the batches per epoch
    (ceil(N/B) with Poisson sampling, floor(N/B) fixed-size batches otherwise)."""
    return 1.0 / (math.ceil(n / batch_size) if poisson else n // batch_size)


def epsilon_of(history: list, delta: float, accountant: str, poisson: bool = True) -> float:
    """Epsilon of a DP-SGD history [(noise multiplier, sample rate, steps), ...] at delta."""
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = create_accountant(accountant)
    acc.history = [tuple(entry) for entry in history]
    extra = {"poisson": poisson} if acc.mechanism() == "gdp" else {}
    # PRV sizes its numerical domain with an RDP bound at delta/4000, whose best order is often
    # the largest: Opacus' warning then concerns that internal bound, not the epsilon returned.
    with hidden_largest_order_warning() if acc.mechanism() == "prv" else contextlib.nullcontext():
        return float(acc.get_epsilon(delta, **extra))


def planned_noise_multiplier(p, n: int, batch_size: int, steps: int) -> float:
    """The noise multiplier that ends `steps` private steps on N examples at p.target_epsilon
    (or p.noise_multiplier when no target is set): a federated client plans all its rounds."""
    if not p.target_epsilon:
        return p.noise_multiplier
    q = sample_rate_of(n, batch_size, p.poisson_sampling)
    try:
        return _noise_for(p.target_epsilon, resolve_delta(p.delta, n), q, steps, p.accountant)
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"dp: --target-epsilon {p.target_epsilon:g} cannot be met in {steps} "
                          f"steps at sample rate {q:.4g} ({err}); use a larger budget, fewer "
                          "rounds or local steps, or a smaller batch size") from None


@functools.lru_cache(maxsize=256)
def _noise_for(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    # A bisection over the accountant (seconds with PRV); a client asks again every round.
    with hidden_largest_order_warning():
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=q, steps=steps, accountant=accountant))


@contextlib.contextmanager
def hidden_largest_order_warning():
    """Hides Opacus' "Optimal order is the largest alpha" where it is about an RDP bound that is
    not the one reported: the noise bisection's probes far below its answer, and PRV's
    internal domain bound (epsilon_of)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float,
                         sample_rate: float = 1.0) -> float:
    """Epsilon of DP-FedAvg with fixed clipping after `rounds` Gaussian releases, for one
    client's whole data (add/remove one client), RDP.

    sample_rate 1 (Flower's DP strategy wrappers, --client-dp server/client): no
    amplification is claimed, as Flower's own accountant; Flower samples a fixed number of
    clients without replacement, not Poisson, so the bound is conservative when
    --fraction-train < 1. sample_rate q < 1 (--client-dp poisson, server/dp_fedavg.py): each
    client joins a round independently with probability q and the release is the
    subsampled Gaussian mechanism Opacus accounts.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = create_accountant("rdp")
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


# --- What Opacus refuses in a built discriminator (config rules live in toolkit/config.py) ------

def module_problems(D: nn.Module) -> list[str]:
    """What Opacus' own validators find in a built discriminator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = (ModuleValidator.validate(D, strict=False)
                  + GradSampleModule.validate(D, strict=False))
    return [f"dp: Opacus refuses the discriminator: {err}" for err in errors]


# --- Poisson batches ------------------------------------------------------------------------------

class PoissonBatches:
    """Poisson-sampled batches of in-memory tensors (Opacus' UniformWithReplacementSampler).

    Epoch e's batches depend only on (seed, e): the sampler's generator is seeded per epoch,
    so a run resumed at batch `start` regenerates the epoch and skips what was done.
    """

    def __init__(self, x: Tensor, y: Optional[Tensor], sample_rate: float, steps: int,
                 seed: int):
        self.x, self.y, self.sample_rate, self.steps, self.seed = x, y, sample_rate, steps, seed

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sampler = UniformWithReplacementSampler(num_samples=len(self.x),
                                                sample_rate=self.sample_rate, generator=gen,
                                                steps=self.steps)
        for b, indices in enumerate(sampler):
            if b < start:
                continue  # drawn all the same: the generator must reach batch `start`
            idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
            yield self.x[idx], None if self.y is None else self.y[idx]


# --- The mode -------------------------------------------------------------------------------------

class PrivateMode:
    """Opacus on D: private D step, Poisson batches, epsilon per epoch, budget stop."""

    name = "dp"

    def prepare(self, parts: DiscriminatorParts, config: Config) -> DiscriminatorParts:
        # Opacus' full backward hooks stay registered on D, and torch warns on every pass
        # whose inputs need no gradient (real images): harmless, since the hooks read
        # parameter gradients only.
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        p = config.privacy
        problems = dp_problems(config) + module_problems(parts.D)
        if p.grad_sample_mode == "bk":
            problems += [f"dp: --grad-sample-mode bk clips Linear, Conv2d and GroupNorm layers; this "
                         f"discriminator also has {layer}: use --grad-sample-mode hooks"
                         for layer in unsupported_layers(parts.D)]
        if problems:
            raise ConfigError(problems)
        self.config = config
        x, y = parts.batches.x, parts.batches.y
        n, b = len(x), config.train.batch_size
        self.delta = resolve_delta(p.delta, n)
        # Opacus derives the sample rate (1 / batches per epoch) and the batch size the noised
        # sum is divided by from a loader; this one is never iterated. drop_last matches the
        # fixed-size batches when Poisson sampling is off.
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=b,
                            drop_last=not p.poisson_sampling)
        self.sample_rate = sample_rate_of(n, b, p.poisson_sampling)  # = 1 / len(loader)
        if p.grad_sample_mode == "bk":
            D, d_opt = self._book_keeping(parts, config, loader)
        else:
            D, d_opt = self._opacus(parts, config, loader)
        steps = len(loader)
        batches = parts.batches
        if p.poisson_sampling:
            batches = PoissonBatches(x, y, self.sample_rate, steps, config.train.seed)
        else:
            d_opt.expected_batch_size = b  # every batch holds exactly b (Opacus assumes N q)
        self.optimizer = d_opt
        self._eps_cache: dict = {}
        # A federated client's round is one of many: the server states every client's plan
        # once (federated.describe_sample_dp), so its own line would repeat each round.
        log.log(
            logging.DEBUG if config.federated.sample_dp else logging.INFO,
            "dp: DP-SGD on D with the %s accountant; noise multiplier %.4g%s, max grad "
            "norm %g, sample rate %.4g (expected batch %g, %s), delta %.3g, per-sample "
            "clipping by '%s'%s", p.accountant, d_opt.noise_multiplier,
            f" (for target epsilon {p.target_epsilon:g} in {config.train.epochs} epochs)"
            if p.target_epsilon else "", p.max_grad_norm, self.sample_rate,
            d_opt.expected_batch_size, "Poisson sampling" if p.poisson_sampling else
            "shuffled fixed-size batches, which the accountant only approximates",
            self.delta, p.grad_sample_mode,
            f", physical batches of at most {p.physical_batch_size}" if p.physical_batch_size
            else "")
        if p.accountant == "gdp":
            log.warning("dp: Opacus calls its GDP accountant experimental; it can underestimate "
                        "epsilon (prefer prv or rdp for a reported guarantee)")
        return DiscriminatorParts(D, d_opt, batches, functools.partial(self._d_step, parts.step))

    def _budget_error(self, config: Config, err: Exception) -> ConfigError:
        p = config.privacy
        return ConfigError(
            f"dp: --target-epsilon {p.target_epsilon:g} cannot be met in "
            f"{config.train.epochs} epochs at sample rate {self.sample_rate:.4g} ({err}); "
            "use a larger budget, fewer epochs or a smaller batch size")

    def _book_keeping(self, parts: DiscriminatorParts, config: Config, loader):
        """toolkit/clipping.py: the same clipping, noise and accounting as Opacus' modes,
        without per-example gradients."""
        p = config.privacy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accountant = create_accountant(p.accountant)
        sigma = p.noise_multiplier
        if p.target_epsilon:
            try:
                with hidden_largest_order_warning():
                    sigma = float(get_noise_multiplier(
                        target_epsilon=p.target_epsilon, target_delta=self.delta,
                        sample_rate=self.sample_rate, epochs=config.train.epochs,
                        accountant=p.accountant))
            except ValueError as err:
                raise self._budget_error(config, err) from None
        self._accountant = accountant
        clipper = BookKeepingClipper(parts.D, p.max_grad_norm)
        expected = int(len(loader.dataset) * self.sample_rate)
        d_opt = BookKeepingOptimizer(parts.optimizer, clipper, sigma, p.max_grad_norm, expected,
                                     accountant, self.sample_rate)
        self._clipper = clipper
        return parts.D, d_opt

    def _opacus(self, parts: DiscriminatorParts, config: Config, loader):
        p = config.privacy
        with warnings.catch_warnings():
            # "Secure RNG turned off": dp_problems explains secure mode; and the GDP
            # accountant's "experimental" warning is repeated in our log below.
            warnings.simplefilter("ignore")
            self.engine = PrivacyEngine(accountant=p.accountant)
        self._accountant = self.engine.accountant
        self._clipper = None
        common = dict(module=parts.D, optimizer=parts.optimizer, data_loader=loader,
                      max_grad_norm=p.max_grad_norm, poisson_sampling=p.poisson_sampling,
                      grad_sample_mode=p.grad_sample_mode)
        if p.target_epsilon:
            try:
                with hidden_largest_order_warning():
                    D, d_opt, _ = self.engine.make_private_with_epsilon(
                        target_epsilon=p.target_epsilon, target_delta=self.delta,
                        epochs=config.train.epochs, **common)
            except ValueError as err:  # Opacus: "The privacy budget is too low."
                raise self._budget_error(config, err) from None
        else:
            D, d_opt, _ = self.engine.make_private(noise_multiplier=p.noise_multiplier, **common)
        return D, d_opt

    # --- the private D step ----------------------------------------------------------------
    def _d_step(self, inner, ctx, D, d_opt, real, labels, measure=False) -> dict:
        """One logical D step: split into physical batches when asked (Opacus'
        BatchMemoryManager protocol: every chunk but the last only clips and accumulates),
        a noise-only step for an empty batch, and only private statistics returned."""
        # Per-sample gradients only inside this step: G's pass through D (and anything else
        # between D steps) then costs what it costs without Opacus. ew has no hooks: G's step
        # goes through the plain network instead (Trainer passes unwrapped(D)).
        self._hooks(D, True)
        if self._clipper is not None and self.config.privacy.fake_gradients == "public":
            ctx = dataclasses.replace(ctx, public_pass=self._clipper.public_pass)
        try:
            stats = self._private_step(inner, ctx, D, d_opt, real, labels, measure)
        finally:
            self._hooks(D, False)
        return {k: v for k, v in stats.items() if k in PRIVATE_D_STATS}

    def _hooks(self, D, on: bool) -> None:
        if self._clipper is not None:
            self._clipper.active = on
            self._clipper.clear_records()  # nothing from an aborted step carries over
        elif isinstance(D, GradSampleModule):
            D.enable_hooks() if on else D.disable_hooks()

    def _private_step(self, inner, ctx, D, d_opt, real, labels, measure) -> dict:
        n = real.shape[0]
        config = ctx.config
        if n == 0:
            stats = self._noise_only_step(D, d_opt, ctx.objective, config, measure)
        else:
            size = config.privacy.physical_batch_size or n
            count = math.ceil(n / size)
            chunks = zip(real.tensor_split(count),
                         labels.tensor_split(count) if labels is not None else [None] * count)
            for i, (r, y) in enumerate(chunks):
                last = i == count - 1
                d_opt.signal_skip_step(do_skip=not last)
                # Measure only after the real (noised) step: a skipped chunk leaves the raw
                # gradient in .grad.
                stats = inner(ctx, D, d_opt, r, y, measure and last)
                # ew refuses a forward while per-sample gradients are held; after a skipped
                # chunk this keeps the accumulated clipped sum (Opacus' zero_grad contract).
                d_opt.zero_grad(set_to_none=True)
        return stats

    def _noise_only_step(self, D, d_opt, objective, config, measure: bool) -> dict:
        # Nothing to clip: the noise alone, accounted like any step, as Opacus' DPDataLoader
        # does for an empty Poisson batch (its optimizer clips zero-length per-sample
        # gradients to a zero sum; the book-keeping clipper has seen no pass and sums zero).
        if self._clipper is None:
            for p in d_opt.params:
                p.grad_sample = torch.zeros((0,) + p.shape, device=p.device, dtype=p.dtype)
        d_opt.step()
        stats = {"d_grad_norm": grad_norm(D)} if measure else {}
        if objective.clip_weights:
            clip_weights(D, config.objective.clip_value)
        d_opt.zero_grad(set_to_none=True)
        return stats

    # --- accounting --------------------------------------------------------------------------
    @property
    def accountant(self):
        return self._accountant

    def steps(self) -> int:
        return sum(entry[2] for entry in self.accountant.history)

    def _epsilon(self, history: list) -> float:
        key = tuple(history)
        if key not in self._eps_cache:
            self._eps_cache[key] = epsilon_of(history, self.delta, self.accountant.mechanism(),
                                              self.config.privacy.poisson_sampling)
        return self._eps_cache[key]

    def epsilon(self) -> float:
        """Epsilon spent so far, at the run's delta."""
        return self._epsilon(self.accountant.history)

    def epsilon_under(self, accountant: str) -> float:
        """The same steps' epsilon under another accountant: the papers report RDP, which
        reads 8-11% above PRV at the same noise, so a table must say which it uses."""
        if accountant == self.accountant.mechanism():
            return self.epsilon()
        key = (accountant, tuple(self.accountant.history))
        if key not in self._eps_cache:
            self._eps_cache[key] = epsilon_of(self.accountant.history, self.delta, accountant,
                                              self.config.privacy.poisson_sampling)
        return self._eps_cache[key]

    def epsilon_after(self, more_steps: int) -> float:
        """Epsilon once `more_steps` further steps at the current noise have been taken."""
        history = list(self.accountant.history)
        sigma = self.optimizer.noise_multiplier
        if history and history[-1][:2] == (sigma, self.sample_rate):
            history[-1] = (sigma, self.sample_rate, history[-1][2] + more_steps)
        elif more_steps:
            history.append((sigma, self.sample_rate, more_steps))
        return self._epsilon(history)

    # --- the mode interface --------------------------------------------------------------------
    def epoch_metrics(self) -> dict:
        p = self.config.privacy
        metrics = {"epsilon": self.epsilon(), "epsilon_rdp": self.epsilon_under("rdp"),
                   "epsilon_prv": self.epsilon_under("prv"), "delta": self.delta,
                   "noise_multiplier": self.optimizer.noise_multiplier,
                   "sample_rate": self.sample_rate, "dp_steps": self.steps(),
                   "accountant": p.accountant}
        if p.target_epsilon:
            metrics["target_epsilon"] = p.target_epsilon
        return metrics

    def stop_reason(self, steps_ahead: int) -> Optional[str]:
        """Refuses the next epoch (or the rest of the current one) when it would take epsilon
        past the target; only a run extended beyond its planned epochs gets here, since the
        noise was derived so that the planned epochs end at or below the target."""
        target = self.config.privacy.target_epsilon
        if not target:
            return None
        after = self.epsilon_after(steps_ahead)
        if after <= target:
            return None
        return (f"privacy budget: epsilon {self.epsilon():.4g} spent, the "
                f"remaining {steps_ahead} steps of this epoch would reach {after:.4g} > target {target:g} (delta "
                f"{self.delta:.3g}); start a new run with a larger --target-epsilon to train "
                "longer")

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(),
                "noise_multiplier": self.optimizer.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        if not state or "accountant" not in state:
            raise UserError("this checkpoint holds no privacy accountant: it was not written "
                            "by a dp run, so its privacy spending is unknown")
        if not math.isclose(state["sample_rate"], self.sample_rate, rel_tol=1e-12):
            raise UserError(f"the checkpoint was trained at sample rate "
                            f"{state['sample_rate']:.6g}, this data and batch size give "
                            f"{self.sample_rate:.6g}; resume with the run's own data and batch "
                            "size")
        self.accountant.load_state_dict(copy.deepcopy(state["accountant"]))
        if state["noise_multiplier"] != self.optimizer.noise_multiplier:
            # A target-epsilon run extended with --epochs derives another noise for the new
            # plan; the run keeps its own, and stop_reason ends it at the target.
            log.info("dp: keeping the run's noise multiplier %.4g (not %.4g)",
                     state["noise_multiplier"], self.optimizer.noise_multiplier)
            self.optimizer.noise_multiplier = state["noise_multiplier"]
        self.delta = state["delta"]



# --- The baseline a private generator is compared with ------------------------------------------

class DPSGDClassifier(nn.Module):
    """The small tanh CNN of Tramer & Boneh 2021 and Opacus' MNIST example: the classifier
    people train directly on private images with DP-SGD (no normalization layers)."""

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        channels, height, width = image_shape
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten())
        with torch.no_grad():
            features = self.body(torch.zeros(1, channels, height, width)).shape[1]
        self.head = nn.Sequential(nn.Linear(features, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@functools.lru_cache(maxsize=256)  # a pure function whose search takes seconds
def dp_sgd_baseline_noise(n: int, target_epsilon: float, delta: float, epochs: int,
                          batch_size: int = 512, accountant: str = "rdp") -> float:
    """The noise multiplier `dp_sgd_classifier_accuracy` trains with on N images. With the seed
    and the data it fixes the baseline's result, so two targets that give the same noise give
    the same baseline (a table can reuse one instead of training it again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, epochs=epochs, accountant=accountant,
            sample_rate=sample_rate_of(n, batch_size, poisson=True)))


def dp_sgd_classifier_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                               target_epsilon: float, delta: float, epochs: int = 20,
                               batch_size: int = 512, lr: float = 0.5, max_grad_norm: float = 0.1,
                               accountant: str = "rdp", seed: int = 0,
                               device: str = "cpu") -> dict:
    """Test accuracy of a classifier trained with DP-SGD on the real private images at
    (target_epsilon, delta): what a user who needs only a classifier would do instead of
    releasing a generator. SGD with momentum 0.9 and a small clip (Tramer & Boneh 2021's
    MNIST setting: batch 512, lr 0.5, clip 0.1), Poisson sampling, noise derived from the
    budget for all `epochs`, the same book-keeping clipping as the dp mode's `bk`."""
    import torch.nn.functional as F

    device = torch.device(device)
    n = len(train_x)
    q = sample_rate_of(n, batch_size, poisson=True)
    steps_per_epoch = math.ceil(n / batch_size)
    sigma = dp_sgd_baseline_noise(n, target_epsilon, delta, epochs, batch_size, accountant)
    account = create_accountant(accountant)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = DPSGDClassifier(tuple(train_x.shape[1:]),
                                int(max(train_y.max(), test_y.max())) + 1).to(device)
        clipper = BookKeepingClipper(model, max_grad_norm)
        optimizer = BookKeepingOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                         clipper, sigma, max_grad_norm, int(n * q), account, q)
        batches = PoissonBatches(train_x.to(device), train_y.to(device), q, steps_per_epoch, seed)
        clipper.active = True
        for epoch in range(epochs):
            for x, y in batches.epoch(epoch):
                optimizer.zero_grad()
                if len(x):
                    F.cross_entropy(model(x), y).backward()
                optimizer.step()  # an empty batch is a noise-only step, accounted as any
        clipper.active = False
        epsilon = float(account.get_epsilon(delta))
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(test_x[i:i + 2000].to(device)).argmax(1).cpu()
                                   for i in range(0, len(test_x), 2000)])
    return {"accuracy": float((predicted == test_y.cpu()).float().mean()), "epsilon": epsilon,
            "noise_multiplier": sigma, "epochs": epochs}
