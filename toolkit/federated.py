"""Federated training with the toolkit's own pieces; Flower itself lives in clients/ and server/.

This module never imports flwr, so everything here is testable without it:

- the weights that travel: G, D and the latent prior in one flat dict, keys prefixed
  "g.", "d." and "p." (one Flower ArrayRecord);
- a client's local round (`local_round`): the standard training loop (Trainer.train_steps)
  on the client's partition, starting from the global weights, with FedProx's proximal term
  when asked, and the metrics its reply carries (`reply_metric_types`: what the server accepts);
- sample-level DP's plan (`sample_dp_plan`): what the server asks of each partition's client
  every round (noise multiplier, steps) and accounts it for;
- the server's global model (`GlobalModel`): per-round history, sample grid, central
  evaluation on the reference split, checkpoints that `gankit generate`/`evaluate` read, and
  resume from the last round.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import Tensor, nn

from gankit.config import Config, n_critic
from gankit.data import ImageData
from gankit.errors import TrainingDiverged
from gankit.evaluate import Reference, generated_features, metrics_of_features, pr_curve
from gankit.latent import build_prior
from gankit.models import build_generator, discriminator_for
from gankit.objectives import get_objective
from gankit.partition import class_histogram, histogram_table, partition, save_histogram
from gankit.recorder import Recorder, sample_grid
from gankit.runs import RunDir
from gankit.sampling import LoadedGenerator
from gankit.steps import StepContext, generator_step
from gankit.trainer import (Trainer, checkpoint_header, generator_optimizer, refuse_other_data,
                            seed_everything, unwrapped)

log = logging.getLogger("gankit")


# --- the weights that travel ------------------------------------------------------------------

def split_for_sync(weights: dict[str, Tensor], sync: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(what the clients train and send back, what they only receive). --sync both: all of it;
    --sync d: D's arrays, and G's and the prior's, which the server alone trains."""
    if sync == "both":
        return dict(weights), {}
    return ({k: v for k, v in weights.items() if k.startswith("d.")},
            {k: v for k, v in weights.items() if not k.startswith("d.")})


def prefixed(G: nn.Module, D: nn.Module, prior: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """Each network with the prefix its arrays carry in a packed dict."""
    return (("g", G), ("d", unwrapped(D)), ("p", prior))


def pack(G: nn.Module, D: nn.Module, prior: nn.Module) -> dict[str, Tensor]:
    """G, D and the prior's state (parameters and buffers) as one flat, prefixed dict."""
    out = {}
    for prefix, module in prefixed(G, D, prior):
        out.update({f"{prefix}.{k}": v.detach().cpu() for k, v in module.state_dict().items()})
    return out


def statistics_keys(G: nn.Module, D: nn.Module, prior: nn.Module) -> frozenset[str]:
    """The packed keys that hold buffers (running statistics, step counters), not weights."""
    return frozenset(f"{prefix}.{k}" for prefix, module in prefixed(G, D, prior)
                     for k, _ in module.named_buffers())


def nonfinite_keys(weights: dict[str, Tensor]) -> list[str]:
    """The keys of the floating arrays that hold a NaN or an infinity."""
    return [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def unpack(weights: dict[str, Tensor], G: nn.Module, D: nn.Module, prior: nn.Module) -> None:
    """Load a packed dict into the networks (in place, so optimizers keep their parameters)."""
    for prefix, module in prefixed(G, D, prior):
        own = module.state_dict()
        state = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
        # Aggregation returns floats for integer buffers (BatchNorm's step counter): cast back.
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
        # Client-level DP noises every aggregated array, and can push BatchNorm's running
        # variance below zero (NaN images); a variance is never negative, so clamp it
        # (post-processing of the private aggregate: no privacy cost).
        state = {k: v.clamp(min=0) if k.endswith("running_var") else v for k, v in state.items()}
        module.load_state_dict(state)


# --- data per client --------------------------------------------------------------------------

def client_partitions(config: Config, data: ImageData) -> list[Tensor]:
    """Each client's training indices: the same on every machine (seeded by the run's seed)."""
    f = config.federated
    return partition(len(data.train_x), data.train_y, f.clients, f.partition, alpha=f.dirichlet_alpha,
                     classes_per_client=f.classes_per_client, seed=config.train.seed,
                     min_size=config.train.batch_size)


def client_data(data: ImageData, indices: Tensor) -> ImageData:
    return ImageData(data.train_x[indices], None if data.train_y is None else data.train_y[indices],
                     data.ref_x, data.ref_y, data.name, data.description)


def describe_partitions(config: Config, data: ImageData, run: Optional[RunDir]) -> list[list[int]]:
    """Log the per-client class histogram and save it (partition.json/png) in the run folder."""
    parts = client_partitions(config, data)
    hist = class_histogram(data.train_y, parts, data.num_classes or 1)
    f = config.federated
    log.info("partition %s across %d clients (images per class):\n%s", f.partition, f.clients,
             histogram_table(hist))
    if run is not None:
        save_histogram(run.path, hist, f.partition, alpha=f.dirichlet_alpha,
                       classes_per_client=f.classes_per_client, seed=config.train.seed)
    return hist


def sample_dp_plan(config: Config, data: ImageData) -> list[dict]:
    """Sample-level DP: per partition, what the server asks of its client each round (the noise
    multiplier planned for all its rounds and the private steps) and what the server accounts
    from: the facts of one round of DP-SGD on that partition. The keys are those of the client's
    reply metrics, so the server can check that a reply did what it was sent."""
    # late: toolkit/privacy.py imports Opacus, which only sample-level DP needs
    from gankit.privacy import resolve_delta, sample_rate_of

    f, p = config.federated, config.privacy
    plan = []
    for client, indices in enumerate(client_partitions(config, data)):
        n = len(indices)
        plan.append({"client": client, "num-examples": n,
                     "noise-multiplier": float(client_noise_multiplier(config, n)),
                     "sample-rate": sample_rate_of(n, config.train.batch_size, p.poisson_sampling),
                     "dp-steps": f.local_steps, "delta": resolve_delta(p.delta, n)})
    return plan


def describe_sample_dp(config: Config, plan: list[dict]) -> None:
    """Sample-level DP: log each client's planned noise (computing the plan fails before
    round 1 when a client's budget cannot be met)."""
    f, p = config.federated, config.privacy
    log.info("sample-level DP: every client's D trains with Opacus, %d private steps per client "
             "over %d rounds, noise multiplier %s%s, max grad norm %g", f.rounds * f.local_steps,
             f.rounds, ", ".join(f"{c['noise-multiplier']:.3g}" for c in plan),
             f" (per client, for target epsilon {p.target_epsilon:g})" if p.target_epsilon else "",
             p.max_grad_norm)


# --- a client's round -------------------------------------------------------------------------

def client_config(config: Config, client: int, server_round: int, examples: int,
                  noise_multiplier: Optional[float] = None) -> Config:
    """The local run of one client in one round: the standard loop with its own batch order,
    or the dp mode (sample-level DP) at the noise the server sent (by default, the noise
    planned for all its rounds)."""
    local = {"tensorboard": False, "progress": False, "eval_every": 0,
             "seed": config.train.seed + 7919 * server_round + client}
    if not config.federated.sample_dp:
        return config.updated({"mode": "standard", **local})
    if noise_multiplier is None:
        noise_multiplier = client_noise_multiplier(config, examples)
    return config.updated({"mode": "dp", "target_epsilon": 0.0, "noise_multiplier": noise_multiplier,
                           **local})


def client_noise_multiplier(config: Config, examples: int) -> float:
    """Sample-level DP: the noise at which a client that trains in every round ends the run
    at --target-epsilon (or --noise-multiplier when no target is set)."""
    # late: toolkit/privacy.py imports Opacus, which only sample-level DP needs
    from gankit.privacy import planned_noise_multiplier

    f = config.federated
    return planned_noise_multiplier(config.privacy, examples, config.train.batch_size,
                                    steps=f.rounds * f.local_steps)


def client_epsilon_bound(config: Config, examples: int, noise: float, steps: int,
                         server_round: int) -> dict:
    """What a client reports of its sample-level privacy after `server_round` rounds: epsilon as
    if it had trained in every round so far (an upper bound when clients are sampled), and the
    facts the server accounts exactly from (noise multiplier, sample rate, steps, delta)."""
    # late: toolkit/privacy.py imports Opacus, which only sample-level DP needs
    from gankit.privacy import epsilon_of, resolve_delta, sample_rate_of

    p = config.privacy
    q = sample_rate_of(examples, config.train.batch_size, p.poisson_sampling)
    delta = resolve_delta(p.delta, examples)
    return {"epsilon": epsilon_of([(noise, q, steps * server_round)], delta, p.accountant,
                                  p.poisson_sampling),
            "noise-multiplier": noise, "sample-rate": q, "dp-steps": steps, "delta": delta}


def add_proximal_term(optimizer: torch.optim.Optimizer, anchor: list[Tensor], mu: float) -> None:
    """FedProx: every step also pulls the weights towards the round's global weights,
    the gradient of mu/2 ||w - w_global||^2 added just before the update."""
    inner = getattr(optimizer, "original_optimizer", optimizer)  # inside Opacus' DPOptimizer
    params = [p for group in inner.param_groups for p in group["params"]]

    def pull(_optimizer, _args, _kwargs):
        for p, a in zip(params, anchor):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)

    inner.register_step_pre_hook(pull)


# What a client's reply carries besides its weights, name -> type (int: an integer; float: any
# finite number). The server refuses a reply with other metrics (server/strategy.py).
REPLY_METRICS = {"num-examples": int, "client": int, "local-steps": int}
# The round's mean training statistics, when the round produced them (no G step, no g_loss;
# the dp mode drops the ones that read the real batch).
LOSS_METRICS = {"d_loss": float, "g_loss": float, "d_acc_real": float, "d_acc_fake": float}
SAMPLE_DP_METRICS = {"epsilon": float, "noise-multiplier": float, "sample-rate": float,
                     "dp-steps": int, "delta": float}


def reply_metric_types(config: Config) -> tuple[dict[str, type], dict[str, type]]:
    """(required, optional) metrics of a client's reply in this run."""
    required = dict(REPLY_METRICS, **(SAMPLE_DP_METRICS if config.federated.sample_dp else {}))
    return required, dict(LOSS_METRICS)


def local_round(config: Config, data: ImageData, weights: dict[str, Tensor], client: int,
                server_round: int, proximal_mu: float = 0.0, noise_multiplier: Optional[float] = None,
                steps: Optional[int] = None, carry: Optional[dict] = None) -> tuple[dict[str, Tensor], dict]:
    """Train from the global weights on this client's data; (new weights, metrics).
    Sample-level DP: the server sends the noise multiplier and the steps (see sample_dp_plan).

    `carry` (with --client-optimizer keep) is what this client keeps between its rounds: the
    optimizers' states of its previous round are read from it and this round's written back.
    A fresh Adam every round starts with zero moments, so its first steps are about lr in
    every coordinate whatever the gradient's scale."""
    local = client_data(data, client_partitions(config, data)[client])
    steps = config.federated.local_steps if steps is None else steps
    trainer = Trainer(client_config(config, client, server_round, len(local.train_x), noise_multiplier),
                      local, None)
    unpack(weights, trainer.G, trainer.D, trainer.prior)
    keep = carry is not None and config.federated.client_optimizer == "keep"
    if keep and "g_opt" in carry:
        try:
            trainer.g_opt.load_state_dict(carry["g_opt"])
            trainer.d_opt.load_state_dict(carry["d_opt"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            log.warning("client %d: its kept optimizer state does not fit (%s); starting fresh",
                        client, type(err).__name__)
            trainer = Trainer(trainer.config, local, None)
            unpack(weights, trainer.G, trainer.D, trainer.prior)
    if proximal_mu:
        for opt, net in ((trainer.g_opt, trainer.G), (trainer.d_opt, unwrapped(trainer.D))):
            add_proximal_term(opt, [p.detach().clone() for p in net.parameters()], proximal_mu)
    trainer.train_generator = config.federated.sync == "both"
    stats = trainer.train_steps(steps)
    if keep:
        carry.clear()
        carry.update({"g_opt": trainer.g_opt.state_dict(), "d_opt": trainer.d_opt.state_dict()})
    metrics = {"num-examples": len(local.train_x), "client": client, "local-steps": steps,
               **{k: float(v) for k, v in stats.items() if k in LOSS_METRICS}}
    if config.federated.sample_dp:
        # What Opacus' optimizer and accountant actually did this round.
        metrics.update(client_epsilon_bound(config, len(local.train_x), trainer.d_opt.noise_multiplier,
                                            trainer.mode.steps(), server_round))
    trained, _ = split_for_sync(pack(trainer.G, trainer.D, trainer.prior), config.federated.sync)
    return trained, metrics


# --- the server's global model ----------------------------------------------------------------

def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB: the server's, and with
    --simulation inline every client's too (Ray's client actors are processes of their own).
    Linux reports KiB, macOS bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


class GlobalModel:
    """The global G and D between rounds: evaluation, samples, history and checkpoints."""

    def __init__(self, config: Config, data: ImageData, run: RunDir, classifier=None):
        self.config, self.data, self.run = config, data, run
        self.num_classes = data.num_classes if config.model.conditional else 0
        # Built like the Trainer builds them, so round 0 starts from the same initial weights
        # as a standard run with this seed.
        seed_everything(config.train.seed)
        self.G = build_generator(config.model, config.latent.latent_dim, data.image_shape,
                                 self.num_classes)
        self.D = discriminator_for(config, data.image_shape, self.num_classes)
        self.prior = build_prior(config.latent, config.train.seed)
        self.round = 0
        self.best: Optional[float] = None
        self.train_time = 0.0  # seconds of rounds done, over every session of this run
        self.server_state: dict = {}  # e.g. the client-level privacy accountant's history
        self.classifier = classifier
        self._reference = None
        self.recorder = Recorder(run, config, "round", config.federated.rounds)
        self._tick = time.perf_counter()
        # --sync d: G's optimizer lives on the server, across rounds and in the checkpoint.
        self.g_opt = (generator_optimizer(self.G, self.prior, config.optim)
                      if config.federated.sync == "d" else None)

    @property
    def weights(self) -> dict[str, Tensor]:
        return pack(self.G, self.D, self.prior)

    @property
    def generator(self):
        return LoadedGenerator(self.G, self.prior, self.config, self.num_classes, self.data.image_shape)

    def resume(self) -> None:
        ckpt = self.run.load_checkpoint("last")
        refuse_other_data(ckpt, self.data, self.run.checkpoint_path("last"))
        for net, key in ((self.G, "G"), (self.D, "D"), (self.prior, "prior")):
            net.load_state_dict(ckpt[key])
        self.round, self.best = ckpt["round"], ckpt.get("best")
        self.train_time = float(ckpt.get("train_time", 0.0))
        if self.g_opt is not None and ckpt.get("g_opt") is not None:
            self.g_opt.load_state_dict(ckpt["g_opt"])
        self.server_state = ckpt.get("server_state", {})
        self.run.truncate_history(self.round, key="round")
        log.info("resumed %s after round %d", self.run.path, self.round)

    def refuse_nonfinite(self, server_round: int, weights: dict[str, Tensor],
                         what: str = "the global model") -> None:
        """Raise TrainingDiverged when any array of `weights` is not finite, before anything of
        the round is written: the last checkpoint stays the last good round's, as a standard
        run keeps its last good epoch."""
        bad = nonfinite_keys(weights)
        if not bad:
            return
        last = self.run.checkpoint_path("last")
        kept = (f"the last good checkpoint is round {self.round} ({last})" if last.exists()
                else "no checkpoint was written before this")
        arrays = bad[0] + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else "")
        raise TrainingDiverged(
            f"{what} became non-finite in round {server_round} ({arrays}); {kept}. Try a lower "
            f"--server-lr or --server-step, lower learning rates, or less client-level noise.")

    def end_round(self, server_round: int, weights: Optional[dict[str, Tensor]], train_metrics: dict,
                  extra: Optional[dict] = None) -> dict:
        """Take the aggregated weights (None: the round failed, keep the previous model),
        evaluate, write samples, history and checkpoints. Returns the round's record. Weights
        that are not finite raise TrainingDiverged and write nothing."""
        if weights is not None:
            self.refuse_nonfinite(server_round, weights)
            unpack(weights, self.G, self.D, self.prior)
        self.round = server_round
        # A round's time is the server's wall clock from the previous round's end (or the
        # start), so it holds the clients' training and the transfers.
        now = time.perf_counter()
        round_time, self._tick = now - self._tick, now
        self.train_time += round_time
        record = {"round": server_round, "aggregated": weights is not None, **train_metrics,
                  **(extra or {}), "round_time_s": round(round_time, 3),
                  "train_time_s": round(self.train_time, 3), "peak_rss_mb": peak_rss_mb()}
        e = self.config.eval
        last = server_round == self.config.federated.rounds
        if self.classifier is not None and e.eval_every and (server_round % e.eval_every == 0 or last):
            record.update(self.evaluate())
        grid = (sample_grid(self.G, self.prior, self.num_classes, self.config.train.seed + 1,
                            torch.device("cpu")) if self.recorder.grid_due(server_round) else None)

        def save(name: str, best: Optional[float]) -> None:
            self.best = best
            self.save(name)

        self.recorder.end(record, self.best, save, grid,
                          "" if weights is not None else " (no update: too few accepted replies)")
        self._tick = time.perf_counter()  # evaluation and checkpoints are not the next round's
        return record

    def start_clock(self) -> None:
        """The first round's time counts from here (after the partitions and the plan)."""
        self._tick = time.perf_counter()

    def train_generator(self, d_weights: dict[str, Tensor], server_round: int) -> dict[str, Tensor]:
        """--sync d: take the aggregated D and train G against it on the server, as many G
        steps as one client would take in its local steps; returns the new global weights.
        G never sees data, so under any DP of D this is post-processing. Seeded by the round,
        so a resumed run trains the same steps."""
        f, t = self.config.federated, self.config.train
        # A non-finite D would only make G non-finite too: stop before training against it.
        self.refuse_nonfinite(server_round, d_weights, "the aggregated D")
        unpack({**d_weights, **split_for_sync(self.weights, "d")[1]}, self.G, self.D, self.prior)
        ctx = StepContext(self.G, self.prior, get_objective(self.config.objective.loss), self.config,
                          self.num_classes, torch.device("cpu"))
        # Only to clear the gradients G's backward pass leaves in D; it never steps.
        d_clear = torch.optim.SGD(self.D.parameters(), lr=0.0)
        torch.manual_seed(t.seed + 104729 * server_round)
        steps = max(1, f.local_steps // n_critic(self.config))
        self.G.train()
        for _ in range(steps):
            generator_step(ctx, self.D, self.g_opt, d_clear, t.batch_size)
        return self.weights

    def account_sample_dp(self, sent: list[dict]) -> dict:
        """Sample-level DP: add the private steps of each client the server sent this round
        (its entries of sample_dp_plan, never a reply's claims) to that client's history (kept
        in server_state, so a resumed run keeps counting) and report every client's epsilon;
        the run's epsilon is the largest. A client is charged for every round it was sent,
        whether it replied, failed or was dropped: the server cannot tell how far it got."""
        # late: toolkit/privacy.py imports Opacus, which only sample-level DP needs
        from gankit.privacy import epsilon_of

        p = self.config.privacy
        clients = self.server_state.setdefault("sample_dp", {})
        for m in sent:
            entry = clients.setdefault(str(int(m["client"])), {"history": [], "delta": float(m["delta"])})
            step = [float(m["noise-multiplier"]), float(m["sample-rate"]), int(m["dp-steps"])]
            history = entry["history"]
            if history and history[-1][:2] == step[:2]:
                history[-1][2] += step[2]
            else:
                history.append(step)
        if not clients:
            return {}
        eps = {c: epsilon_of(e["history"], e["delta"], p.accountant, p.poisson_sampling)
               for c, e in sorted(clients.items(), key=lambda item: int(item[0]))}
        worst = max(eps, key=eps.get)
        if p.target_epsilon and eps[worst] > p.target_epsilon * 1.01:
            log.warning("sample-level DP: client %s has spent epsilon %.3g, past --target-epsilon %g "
                        "(the rounds were extended beyond the plan)", worst, eps[worst], p.target_epsilon)
        return {"epsilon": eps[worst], "delta": clients[worst]["delta"],
                "epsilon_per_client": {c: round(v, 4) for c, v in eps.items()}}

    def evaluate(self) -> dict:
        """The global G's in-training metrics (and, with --pr-curves, the round's PRD curve)."""
        if self._reference is None:
            self._reference = Reference.of(self.classifier, self.data.ref_x, self.data.ref_y)
        features = generated_features(self.generator, self.classifier, self.config)
        metrics = metrics_of_features(features, self._reference, self.config)
        if self.config.eval.pr_curves:
            metrics.update(pr_curve(self._reference, features[0], self.config.train.seed,
                                    self.run.path / "prd" / f"round_{self.round:03d}.png",
                                    self.recorder.writer, self.round))
        return metrics

    def save(self, name: str) -> None:
        """A checkpoint that `gankit generate` and `gankit evaluate` read like any other."""
        self.run.save_checkpoint({
            **checkpoint_header(self.config, self.data, self.num_classes),
            "round": self.round, "best": self.best, "train_time": self.train_time,
            "g_opt": self.g_opt.state_dict() if self.g_opt is not None else None,
            "server_state": self.server_state,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "prior": self.prior.state_dict(),
            "ema": None,
        }, name)
