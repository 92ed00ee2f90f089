"""Discriminator Rejection Sampling (DRS; Azadi et al. 2019).

A discriminator trained with the logistic loss has, at its optimum, the logit
D~(x) = log p_data(x) / p_g(x). Classic rejection sampling from p_g towards p_data accepts x
with probability p_data(x) / (M p_g(x)) = exp(D~(x) - D~*), where D~* = max D~ = log M.
The paper's practical version accepts with probability sigmoid(F(x)),

    F(x) = D~(x) - D~* - log(1 - exp(D~(x) - D~* - eps)) - gamma,

which equals exp(D~(x) - D~*) exactly when gamma = 0 and eps -> 0; gamma > 0 accepts fewer
and more "confident" samples, gamma < 0 more. D~* is estimated as the largest logit of a
burn-in of generated samples and raised whenever a larger logit turns up while sampling.
gamma is given directly, taken as a percentile of F over the burn-in (the paper uses e.g.
the 80th to 95th), or found by bisection so that the burn-in's mean acceptance probability
equals a target rate.

Where D's output comes from:
- `bce`: D's raw output is the logit itself.
- f-GANs whose optimal output T* = f'(p/q) inverts to an affine function of D's raw output v
  (Nowozin et al. 2016): js and rkl give log(p/q) = v, kl gives v - 1, hellinger gives 2v.
  These maps need nothing but D (`DENSITY_RATIO_LOGITS`).
- wgan, wgan-gp and hinge critics, lsgan and pearson have no usable closed form (critic
  values are not density ratios; lsgan's and pearson's inverses leave their domain). Their
  raw scores are *calibrated*: `fit_calibration` fits a 1-D logistic regression head
  a * v + b on D's scores of real (label 1) versus generated (label 0) samples, a calibrated
  logit. A calibration can be asked for with any objective.

Privacy: DRS itself reads only D, G and freshly generated samples, so applied to a
differentially private D and G it is post-processing and costs no privacy. A calibration
fitted on real data USES that real data: the resulting samples are not covered by the
training run's privacy guarantee unless the calibration data is public or the fit is itself
made private. `Calibration.uses_real_data`, `RejectionSampler.uses_real_data` and
`SamplingStats.uses_real_data` say so explicitly; `rejection_sampler_for` calibrates only
when the objective leaves no other way, or when asked to.

D estimates the density ratio against the generator it was trained with (the raw G): for an
EMA copy of G its logits are only approximate; a calibration against samples of the EMA
generator can partly correct them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from gankit.errors import UserError
from gankit.objectives import OBJECTIVES
from gankit.sampling import eval_mode

DEFAULT_EPS = 1e-6

# Objective name -> D's raw output v -> its estimate of log p_data / p_g at D's optimum: each
# objective's own `density_ratio_logit`, where it has a closed form.
DENSITY_RATIO_LOGITS: dict[str, Callable[[Tensor], Tensor]] = {
    name: objective.density_ratio_logit for name, objective in OBJECTIVES.items()
    if objective.density_ratio_logit is not None}

Generate = Callable[[int], tuple[Tensor, Optional[Tensor]]]
Score = Callable[[Tensor, Optional[Tensor]], Tensor]


class AcceptanceTooLow(UserError):
    """Sampling hit its draw limit before accepting the requested number of samples."""

    def __init__(self, message: str, stats: "SamplingStats"):
        super().__init__(message)
        self.stats = stats


# --- calibration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Calibrated logit a * v + b of D's raw output v, fitted on real and generated scores."""

    a: float
    b: float
    n_real: int
    n_fake: int
    # Always True: a calibration is fitted on real data (see the module docstring).
    uses_real_data: bool = True

    def __call__(self, v: Tensor) -> Tensor:
        return self.a * v + self.b


def fit_calibration(real_scores: Tensor, fake_scores: Tensor, ridge: float = 1e-4) -> Calibration:
    """Logistic regression of "real" on D's raw scores: P(real | v) = sigmoid(a v + b).

    scikit-learn's LogisticRegression with balanced class weights, so that a v + b estimates
    log p_data / p_g (the log odds under equal priors), not the odds of the sample counts.
    The scores are standardised first (undone in the returned a, b); `ridge` is a small L2
    penalty on the standardised slope against the mean log-loss, which keeps the fit finite
    when D separates the two sets perfectly. lbfgs on a convex loss: deterministic.
    """
    from sklearn.linear_model import LogisticRegression

    real = _flat_scores(real_scores, "real")
    fake = _flat_scores(fake_scores, "generated")
    scores = torch.cat([real, fake])
    mean, std = scores.mean(), scores.std()
    if not torch.isfinite(std) or std <= 0:
        raise UserError("cannot calibrate: the discriminator gives every sample the same score")
    features = ((scores - mean) / std).numpy()[:, None]
    is_real = np.concatenate([np.ones(real.numel()), np.zeros(fake.numel())])
    # scikit-learn minimises 0.5 w^2 + C sum_i weight_i loss_i; balanced weights sum to n, so
    # C = 1 / (ridge n) is the mean loss plus 0.5 ridge w^2 (the intercept is not penalised).
    model = LogisticRegression(C=1.0 / (ridge * len(features)), class_weight="balanced",
                               solver="lbfgs", tol=1e-10, max_iter=1000)
    model.fit(features, is_real)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    a = slope / std.item()
    b = intercept - a * mean.item()
    if a <= 0:
        warnings.warn(f"calibrated slope a = {a:.3g} <= 0: the discriminator does not rank real "
                      "samples above generated ones, so rejection sampling will not help",
                      stacklevel=2)
    return Calibration(a, b, int(real.numel()), int(fake.numel()))


def _flat_scores(scores: Tensor, what: str) -> Tensor:
    scores = torch.as_tensor(scores).detach().flatten().to("cpu", torch.float64)
    if scores.numel() < 2:
        raise UserError(f"calibration needs at least 2 {what} samples, got {scores.numel()}")
    if not torch.isfinite(scores).all():
        raise UserError(f"the discriminator returned non-finite scores on {what} samples")
    return scores


# --- the acceptance rule -------------------------------------------------------------------

def acceptance_score(logits: Tensor, max_logit: float, eps: float = DEFAULT_EPS,
                     gamma: float = 0.0) -> Tensor:
    """The paper's F(x); accept with probability sigmoid(F). Needs logits <= max_logit."""
    shifted = logits - max_logit
    # log(1 - exp(s)) as log(-expm1(s)): accurate for s near 0, where the max sample sits.
    return shifted - torch.log(-torch.expm1(shifted - eps)) - gamma


@dataclass
class SamplingStats:
    requested: int
    draws: int
    # Every accepted draw, including those beyond `requested` in the last batch.
    accepted: int
    acceptance_rate: float
    max_logit: float          # D~* at the end of sampling
    burn_in_max_logit: float  # D~* as estimated by the burn-in
    gamma: float
    burn_in: int
    # Mean acceptance probability over the burn-in: the rate `fit` expected.
    expected_acceptance: float
    uses_real_data: bool

    def as_dict(self) -> dict:
        return asdict(self)


class RejectionSampler:
    """Discriminator rejection sampling around any generator and scorer.

    generate(n) -> (images, labels or None): n fresh samples; the caller seeds it.
    score(images, labels) -> (n,) D's raw outputs; already logits of p_data / p_g unless
        `calibration` maps them (any callable v -> logit, usually a `Calibration`).
    gamma / gamma_percentile / target_acceptance: at most one; none means gamma = 0, exact
        rejection sampling if the logits were exact.
    burn_in: generated samples used to estimate D~* and to choose gamma.
    seed: of the uniform draws that decide acceptance.
    """

    def __init__(self, generate: Generate, score: Score, *,
                 calibration: Optional[Callable[[Tensor], Tensor]] = None,
                 eps: float = DEFAULT_EPS, gamma: Optional[float] = None,
                 gamma_percentile: Optional[float] = None,
                 target_acceptance: Optional[float] = None, burn_in: int = 10_000,
                 batch_size: int = 500, seed: int = 0):
        chosen = [name for name, value in (("gamma", gamma), ("gamma_percentile", gamma_percentile),
                                           ("target_acceptance", target_acceptance))
                  if value is not None]
        if len(chosen) > 1:
            raise UserError(f"choose at most one of {', '.join(chosen)}")
        if gamma_percentile is not None and not 0 <= gamma_percentile <= 100:
            raise UserError(f"gamma percentile must be in [0, 100], got {gamma_percentile}")
        if target_acceptance is not None and not 0 < target_acceptance < 1:
            raise UserError(f"target acceptance rate must be in (0, 1), got {target_acceptance}")
        if not eps > 0:
            raise UserError(f"eps must be positive, got {eps}")
        if burn_in < 1 or batch_size < 1:
            raise UserError(f"burn-in and batch size must be positive, got {burn_in}, {batch_size}")
        self.generate, self.score, self.calibration = generate, score, calibration
        self.eps, self.burn_in, self.batch_size = float(eps), int(burn_in), int(batch_size)
        self.gamma_percentile, self.target_acceptance = gamma_percentile, target_acceptance
        self.gamma: float = 0.0 if gamma is None else float(gamma)
        self.max_logit: Optional[float] = None
        self.burn_in_max_logit: Optional[float] = None
        self.expected_acceptance: Optional[float] = None
        self._rng = torch.Generator().manual_seed(seed)

    @property
    def uses_real_data(self) -> bool:
        """True when the logits pass through a calibration fitted on real data."""
        if self.calibration is None:
            return False
        return bool(getattr(self.calibration, "uses_real_data", True))

    @property
    def fitted(self) -> bool:
        return self.max_logit is not None

    @torch.no_grad()
    def logits(self, images: Tensor, labels: Optional[Tensor]) -> Tensor:
        """Estimated log p_data / p_g of each sample, float64 on the CPU."""
        raw = torch.as_tensor(self.score(images, labels)).detach().flatten()
        if raw.numel() != images.shape[0]:
            raise ValueError(f"score returned {raw.numel()} values for {images.shape[0]} samples")
        logits = raw.to("cpu", torch.float64)
        if self.calibration is not None:
            logits = self.calibration(logits)
        # -inf is a sure rejection; NaN or +inf mean a broken discriminator.
        if torch.isnan(logits).any() or (logits == math.inf).any():
            raise UserError("the discriminator returned NaN or infinite scores")
        return logits

    def acceptance_probability(self, logits: Tensor) -> Tensor:
        """sigmoid(F) at the current D~* and gamma (logits above D~* count as D~*)."""
        if not self.fitted:
            raise RuntimeError("call fit() first")
        clipped = logits.clamp(max=self.max_logit)
        return torch.sigmoid(acceptance_score(clipped, self.max_logit, self.eps, self.gamma))

    @torch.no_grad()
    def fit(self) -> "RejectionSampler":
        """Burn-in: estimate D~* and choose gamma."""
        batches = []
        for start in range(0, self.burn_in, self.batch_size):
            images, labels = self.generate(min(self.batch_size, self.burn_in - start))
            batches.append(self.logits(images, labels))
        logits = torch.cat(batches)
        max_logit = logits.max().item()
        if not math.isfinite(max_logit):
            raise UserError("every burn-in sample has logit -inf; nothing can be accepted")
        self.max_logit = self.burn_in_max_logit = max_logit
        scores = acceptance_score(logits, max_logit, self.eps)  # F with gamma = 0
        if self.gamma_percentile is not None:
            self.gamma = torch.quantile(scores, self.gamma_percentile / 100.0).item()
        elif self.target_acceptance is not None:
            self.gamma = _gamma_for_rate(scores, self.target_acceptance)
        self.expected_acceptance = torch.sigmoid(scores - self.gamma).mean().item()
        return self

    @torch.no_grad()
    def sample(self, n: int, max_draws: Optional[int] = None
               ) -> tuple[Tensor, Optional[Tensor], SamplingStats]:
        """n accepted samples (in draw order), their labels (or None) and statistics.

        Draws at most `max_draws` candidates (default 100 n, i.e. down to a 1% acceptance
        rate) and raises `AcceptanceTooLow` if they do not yield n samples.
        """
        if n < 1:
            raise UserError(f"number of samples must be positive, got {n}")
        max_draws = 100 * n if max_draws is None else int(max_draws)
        if not self.fitted:
            self.fit()
        kept_images, kept_labels = [], []
        draws = accepted = 0
        while accepted < n and draws < max_draws:
            images, labels = self.generate(min(self.batch_size, max_draws - draws))
            logits = self.logits(images, labels)
            # Raise D~* before scoring the batch, so no sample has a logit above it.
            self.max_logit = max(self.max_logit, logits.max().item())
            keep = torch.rand(logits.shape, generator=self._rng, dtype=torch.float64) \
                < self.acceptance_probability(logits)
            draws += logits.numel()
            accepted += int(keep.sum())
            keep = keep.to(images.device)
            kept_images.append(images[keep])
            if labels is not None:
                kept_labels.append(labels[keep])
        stats = SamplingStats(
            requested=n, draws=draws, accepted=accepted,
            acceptance_rate=accepted / max(draws, 1), max_logit=self.max_logit,
            burn_in_max_logit=self.burn_in_max_logit, gamma=self.gamma, burn_in=self.burn_in,
            expected_acceptance=self.expected_acceptance, uses_real_data=self.uses_real_data)
        if accepted < n:
            raise AcceptanceTooLow(
                f"rejection sampling accepted only {accepted} of {n} samples in {draws} draws "
                f"(acceptance rate {stats.acceptance_rate:.2%}); allow more draws or accept more "
                f"(lower gamma or its percentile, or a higher target acceptance rate)", stats)
        images = torch.cat(kept_images)[:n]
        labels = torch.cat(kept_labels)[:n] if kept_labels else None
        return images, labels, stats


def _gamma_for_rate(scores: Tensor, rate: float, iterations: int = 200) -> float:
    """gamma with mean(sigmoid(F - gamma)) = rate, by bisection (the mean falls with gamma)."""
    finite = scores[torch.isfinite(scores)]
    # sigmoid(+-40) is 1 or 0 to double precision: the root lies between these bounds.
    low, high = finite.min().item() - 40.0, finite.max().item() + 40.0
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if torch.sigmoid(scores - mid).mean().item() > rate:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


# --- wiring to trained models --------------------------------------------------------------

def density_ratio_logit(objective: str) -> Optional[Callable[[Tensor], Tensor]]:
    """D's raw output -> log p_data / p_g for objectives with a closed form, else None."""
    if objective not in OBJECTIVES:
        raise UserError(f"unknown loss '{objective}' (choose from {', '.join(OBJECTIVES)})")
    return DENSITY_RATIO_LOGITS.get(objective)


def discriminator_scores(D: nn.Module, images: Tensor, labels: Optional[Tensor] = None,
                         batch_size: int = 500) -> Tensor:
    """D's raw outputs (N,) in eval mode, in batches, on D's device."""
    device = next(D.parameters()).device
    out = []
    with torch.no_grad(), eval_mode(D):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            y = None if labels is None else labels[start:start + batch_size].to(device)
            out.append(D(x, y).flatten())
    return torch.cat(out)


def rejection_sampler_for(loaded, D: nn.Module, objective: str, *,
                          calibrate: Optional[bool] = None,
                          real_images: Optional[Tensor] = None,
                          real_labels: Optional[Tensor] = None,
                          calibration_samples: Optional[int] = None,
                          sigma: Optional[float] = None, truncation: Optional[float] = None,
                          label: Optional[int] = None, seed: int = 0, batch_size: int = 500,
                          **options) -> RejectionSampler:
    """A `RejectionSampler` for a `toolkit.sampling.LoadedGenerator` and its discriminator.

    calibrate: None calibrates only when `objective` has no closed-form logit (wgan,
        wgan-gp, hinge, lsgan, pearson), True always, False never. Calibrating needs
        `real_images` (and `real_labels` for a conditional D), preferably held out from
        training, and makes the sampler use real data (`uses_real_data`).
    calibration_samples: generated samples for the calibration; default: as many as real.
    sigma, truncation, label: as in `LoadedGenerator.sample`; label fixes the class of a
        conditional model, otherwise labels are uniform.
    seed: seeds the latents, labels and the acceptance draws.
    options: passed to `RejectionSampler` (eps, gamma, gamma_percentile, target_acceptance,
        burn_in).
    Call `.fit()` (or just `.sample(n)`) on the result. G and D run in eval mode.
    """
    to_logit = density_ratio_logit(objective)
    if calibrate is None:
        calibrate = to_logit is None
    if not calibrate and to_logit is None:
        raise UserError(f"the '{objective}' discriminator's outputs are not density-ratio "
                        "logits; rejection sampling needs a calibration on real data")
    if calibrate and real_images is None:
        raise UserError(f"calibrating the '{objective}' discriminator for rejection sampling "
                        "needs real images")
    num_classes = loaded.num_classes
    if label is not None and not 0 <= label < num_classes:
        raise UserError(f"a class label needs a conditional model and a class in "
                        f"[0, {num_classes})")
    G, prior = loaded.G, loaded.prior
    device = next(G.parameters()).device
    # One stream for every draw, so calibration, burn-in and sampling never reuse latents.
    rng = torch.Generator(device=device).manual_seed(seed)

    def generate_with(m: int, fixed_label: Optional[int]):
        labels = None
        if num_classes:
            labels = (torch.full((m,), fixed_label, device=device) if fixed_label is not None
                      else torch.randint(num_classes, (m,), generator=rng, device=device))
        z = prior.sample(m, generator=rng, sigma=sigma, truncation=truncation, device=device)
        with torch.no_grad(), eval_mode(G):
            return G(z, labels), labels

    def score(images: Tensor, labels: Optional[Tensor]) -> Tensor:
        return discriminator_scores(D, images, labels, batch_size)

    calibration = None
    if calibrate:
        if num_classes and real_labels is None:
            raise UserError("calibrating a conditional discriminator needs the real labels")
        real_scores = score(real_images, real_labels if num_classes else None)
        n_fake = calibration_samples or real_images.shape[0]
        fake_scores = [score(*generate_with(min(batch_size, n_fake - start), None))
                       for start in range(0, n_fake, batch_size)]
        calibration = fit_calibration(real_scores, torch.cat(fake_scores))
    return RejectionSampler(
        lambda m: generate_with(m, label),
        score if calibrate else (lambda images, labels: to_logit(score(images, labels))),
        calibration=calibration, batch_size=batch_size, seed=seed, **options)
