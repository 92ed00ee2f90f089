"""Every option of a run, as dataclasses: the single source of defaults.

A run's `Config` is one dataclass per option group. Field names are unique across groups
because the command line is flat (`--d-lr`, `--latent-dim`, ...). A config is saved as
JSON in its run folder; `Config.load` reads it back, so a run can be reproduced and
resumed from its folder alone.
"""


import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from gankit.errors import ConfigError
from gankit.files import parse_json, read_text, shorten, write_text

MAX_CONFIG_BYTES = 2**20

# cdcgan: the DP-GAN record's class-conditional DCGAN (Bie et al. 2023), toolkit/models/cdcgan.py
GENERATOR_ARCHS = ("dcgan", "mlp", "cdcgan")
DISCRIMINATOR_ARCHS = ("dcgan", "mlp", "maxout", "cdcgan")
G_NORMS = ("batch", "none")
# GroupNorm is the default: as good as BatchNorm for DCGAN on MNIST (10-epoch comparison), and
# per-sample, so the same D works under Opacus (BatchNorm mixes samples).
D_NORMS = ("none", "group", "layer", "instance", "batch")
CONDITIONINGS = ("projection", "concat")
PRIORS = ("gaussian", "mixture")
FAKE_LABELS = ("uniform", "data")
LR_DECAYS = ("none", "linear", "exponential")
MODES = ("standard", "dp", "federated")  # dp: toolkit/privacy.py; federated: server/, clients/
ACCOUNTANTS = ("rdp", "prv", "gdp")
# bk: toolkit/clipping.py (book-keeping); the others are Opacus' per-sample gradient modes.
GRAD_SAMPLE_MODES = ("bk", "ew", "hooks", "functorch")
DEVICES = ("cpu", "cuda", "auto")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "trimmed-mean", "krum")
PARTITIONS = ("iid", "dirichlet", "pathological")
CLIENT_DP = ("none", "server", "client", "poisson")
CLIENT_OPTIMIZERS = ("reset", "keep")
SYNCS = ("both", "d")
SIMULATIONS = ("ray", "inline")
D_STEPS_SCHEDULES = ("fixed", "adaptive")  # toolkit/schedule.py
FAKE_GRADIENTS = ("paired", "public")
# The metrics --best-metric can follow, each with the direction that is better.
BEST_METRICS = {"fid": "min", "precision": "max", "recall": "max", "density": "max",
                "coverage": "max"}


def option(default: Any, help: str, **metadata: Any):
    """A dataclass field whose --help line shows its default.

    argparse-dataclass hands argparse a sentinel instead of the default (so that only the
    options a user typed are seen), which hides the default from --help; we add it here.
    """
    if default is True:
        # argparse-dataclass offers such an option only as --no-<name>, which turns it off.
        return field(default=True, metadata={"help": f"turn off: {help} (on by default)",
                                             **metadata})
    if "(default:" in help:  # the help says the default in its own words
        return field(default=default, metadata={"help": help, **metadata})
    shown = "none" if default is None else default
    return field(default=default, metadata={"help": f"{help} (default: {shown})", **metadata})


@dataclass
class DataConfig:
    dataset: str = option(
        "auto",
        "mnist | fashion-mnist | mnist-5k | folder:PATH | npz:PATH | auto "
        "(auto = mnist if found under --data-root, else the offline mnist-5k)",
    )
    data_root: str = option(
        "data", "where mnist/fashion-mnist live: a torchvision root or a folder of the IDX files"
    )
    holdout_fraction: float = option(
        0.1, "share of the training data held out as the reference when no test split exists"
    )
    limit: int = option(0, "use only the first N training images (0 = all)")
    image_size: int = option(0, "resize images to this size (0 = keep the data's own size)")
    download: bool = option(False, "mnist/fashion-mnist: download into --data-root when the files "
                                   "are not there (off: nothing is fetched or created unless asked)")
    max_data_gb: float = option(8.0, "largest dataset gankit reads, in GB of float32 pixels; its "
                                     "declared size is checked before it is read (raise it for "
                                     "bigger data)")


@dataclass
class ModelConfig:
    g_arch: str = option("dcgan", "generator: " + " | ".join(GENERATOR_ARCHS))
    d_arch: str = option("dcgan", "discriminator: " + " | ".join(DISCRIMINATOR_ARCHS))
    g_width: int = option(64, "generator width: base channels (dcgan); mlp hidden units = 4 x width")
    d_width: int = option(64, "discriminator width: base channels (dcgan); mlp/maxout hidden units = 4 x width")
    g_depth: int = option(
        0, "generator depth: upsampling stages (dcgan) or hidden layers (mlp); 0 = automatic"
    )
    d_depth: int = option(
        0, "discriminator depth: downsampling stages (dcgan) or hidden layers; 0 = automatic"
    )
    g_norm: str = option("batch", "generator normalization: " + " | ".join(G_NORMS))
    d_norm: str = option("group", "discriminator normalization: " + " | ".join(D_NORMS))
    spectral_norm: bool = option(False, "spectral normalization on every discriminator layer")
    d_dropout: float = option(0.0, "dropout probability in the discriminator")
    instance_noise: float = option(
        0.0, "std of Gaussian noise added to the discriminator's inputs (instance noise)"
    )
    instance_noise_anneal: bool = option(
        False, "decay the instance noise linearly to zero over the run"
    )
    maxout_pieces: int = option(5, "linear pieces per maxout unit")
    conditional: bool = option(False, "class-conditional generator and discriminator")
    conditioning: str = option(
        "projection", "how the discriminator sees labels: " + " | ".join(CONDITIONINGS)
    )
    label_embed_dim: int = option(32, "size of the generator's label embedding")
    max_model_gb: float = option(8.0, "largest training state of G and D (weights, gradients, "
                                      "optimizer moments) in GB, checked before they are built "
                                      "(raise it on a larger machine)")


@dataclass
class ObjectiveConfig:
    loss: str = option(
        "bce", "bce | kl | rkl | js | pearson | hellinger | wgan | wgan-gp | hinge | lsgan"
    )
    minimax_g: bool = option(
        False, "use the saturating minimax generator loss instead of the non-saturating one"
    )
    n_critic: int = option(0, "discriminator steps per generator step (0 = 5 for wgan/wgan-gp, "
                              "else 1); with --d-steps-schedule adaptive, the starting rate")
    d_steps_schedule: str = option(
        "fixed", "D steps per G step: fixed (--n-critic) | adaptive (Bie et al. 2023: climb 1, "
                 "2, 5, 10, 20, 50, 100, ... when D's moving-average accuracy on fresh fakes "
                 "falls to --d-steps-threshold)")
    d_steps_threshold: float = option(0.6, "adaptive D steps: climb when D's average accuracy "
                                           "on fresh fakes is at or below this")
    d_steps_grace: int = option(200, "adaptive D steps: G steps at a rate before it may climb")
    d_steps_beta: float = option(0.99, "adaptive D steps: moving-average factor of D's accuracy")
    mode_seeking: float = option(
        0.0, "weight of the mode-seeking term in G's loss (Mao et al. 2019): fakes from two "
             "latents with the same label (and mixture component) are pushed apart, against a G "
             "that ignores z (0 = off)")
    aux_classifier: float = option(
        0.0, "weight of an auxiliary classifier (AC-GAN, Odena et al. 2017): D also learns the "
             "real images' classes, and G is trained to have its fakes read as the label asked "
             "for (conditional models; 0 = off)")
    clip_value: float = option(0.01, "wgan: clip every discriminator weight to [-c, c]")
    gp_weight: float = option(10.0, "wgan-gp: gradient penalty weight lambda")
    label_smoothing: float = option(
        0.0, "bce/lsgan: one-sided label smoothing, real target = 1 - s"
    )
    real_label_min: float = option(1.0, "bce/lsgan: soft real targets drawn from [min, max]")
    real_label_max: float = option(1.0, "bce/lsgan: soft real targets drawn from [min, max]")
    fake_label_min: float = option(0.0, "bce/lsgan: soft fake targets drawn from [min, max]")
    fake_label_max: float = option(0.0, "bce/lsgan: soft fake targets drawn from [min, max]")


@dataclass
class LatentConfig:
    latent_dim: int = option(100, "size of the latent vector z")
    prior: str = option("gaussian", "latent prior: " + " | ".join(PRIORS))
    latent_sigma: float = option(1.0, "scale of the Gaussian prior (below 1 = soft truncation)")
    truncation: float = option(
        0.0, "hard truncation: resample latent entries beyond this absolute value (0 = off)"
    )
    mixture_components: int = option(10, "mixture prior: number of components K")
    mixture_learnable: bool = option(
        True, "mixture prior: learn the means and scales with the generator (DeLiGAN)"
    )
    mixture_sigma_init: float = option(0.2, "mixture prior: initial scale of every component")
    mixture_sigma_reg: float = option(
        0.0, "mixture prior: weight of DeLiGAN's penalty sum((1 - sigma)^2) on learned scales"
    )
    fake_labels: str = option(
        "uniform", "conditional training: the classes of G's fakes, uniform or data (drawn with "
        "the training labels' frequencies: a non-IID federated client trains only the classes "
        "it holds); sampling after training stays uniform"
    )


@dataclass
class OptimConfig:
    g_lr: float = option(2e-4, "generator Adam learning rate")
    d_lr: float = option(2e-4, "discriminator Adam learning rate")
    g_beta1: float = option(0.5, "generator Adam beta1")
    g_beta2: float = option(0.999, "generator Adam beta2")
    d_beta1: float = option(0.5, "discriminator Adam beta1")
    d_beta2: float = option(0.999, "discriminator Adam beta2")
    lr_decay: str = option("none", "learning-rate decay per epoch: " + " | ".join(LR_DECAYS))
    lr_gamma: float = option(0.95, "exponential decay factor per epoch")
    ema_decay: float = option(0.0, "keep an exponential moving average of G's weights (0 = off)")


@dataclass
class TrainConfig:
    mode: str = option("standard", "training mode: " + " | ".join(MODES))
    epochs: int = option(10, "passes over the training data")
    batch_size: int = option(64, "real images per discriminator step")
    seed: int = option(0, "seed of every random choice in the run")
    device: str = option("cpu", "cpu | cuda | auto")
    out_dir: str = option("runs", "folder that holds run folders")
    name: str = option("", "run folder name, one folder inside --out-dir (default: "
                           "<arch>-<loss>-<timestamp>)")
    sample_every: int = option(1, "write a sample grid every N epochs")
    log_every: int = option(50, "write TensorBoard scalars every N steps")
    checkpoint_every: int = option(
        0, "also save the last checkpoint every N steps within an epoch (0 = at epoch ends only)"
    )
    tensorboard: bool = option(True, "write TensorBoard logs")
    progress: bool = option(True, "show progress bars")


@dataclass
class PrivacyConfig:
    """Options of the dp mode (Opacus makes the discriminator private)."""
    target_epsilon: float = option(
        0.0, "dp: privacy budget epsilon for the planned epochs; the noise multiplier is derived "
             "from it (0 = use --noise-multiplier)")
    noise_multiplier: float = option(1.0, "dp: Gaussian noise std / clipping norm")
    delta: float = option(0.0, "dp: delta (0 = 1e-5, or 1/(10 N) when 1e-5 is not below 1/N)")
    max_grad_norm: float = option(1.0, "dp: per-sample gradient clipping norm of D")
    accountant: str = option("prv", "dp: privacy accountant: " + " | ".join(ACCOUNTANTS))
    poisson_sampling: bool = option(True, "dp: Poisson sampling of real batches (what the "
                                          "accountants assume)")
    physical_batch_size: int = option(
        0, "dp: split each logical batch into chunks of this size to bound memory (0 = no split)")
    # hooks: the fastest correct mode here (benchmarks/dp_step.py; all are correct).
    grad_sample_mode: str = option("hooks", "dp: per-example clipping: bk (book-keeping, "
                                            "toolkit/clipping.py) or an Opacus per-sample "
                                            "gradient mode: " + " | ".join(GRAD_SAMPLE_MODES))
    fake_gradients: str = option(
        "paired", "dp: D's gradient on G's fakes: paired (clipped together with its real "
                  "partner, as Opacus' modes do) | public (added exactly, outside the clipping "
                  "and noise: fakes read no private data; needs --grad-sample-mode bk)")
    secure_mode: bool = option(False, "dp: Opacus' cryptographically secure noise and sampling "
                                      "(needs torchcsprng; refused, see the dp mode's notes)")


@dataclass
class FederatedConfig:
    """Options of the federated mode (Flower: clients/ and server/)."""
    clients: int = option(4, "federated: number of clients (simulated, or SuperNodes when deployed)")
    rounds: int = option(5, "federated: server rounds")
    local_steps: int = option(50, "federated: discriminator steps each sampled client trains per round")
    fraction_train: float = option(1.0, "federated: share of the clients sampled each round")
    min_clients: int = option(
        0, "federated: fewest replies a round needs (0 = every sampled client; fewer lets a "
           "round survive failed clients)")
    strategy: str = option("fedavg", "federated: aggregation: " + " | ".join(STRATEGIES))
    proximal_mu: float = option(0.01, "federated: FedProx proximal term weight")
    server_lr: float = option(0.01, "federated: FedAdam server learning rate (eta)")
    server_step: float = option(
        1.0, "federated: fedavgm: server learning rate on the mean update (1 = FedAvg's step; K "
             "moves the global model by the sum of K IID clients' updates)")
    server_momentum: float = option(0.0, "federated: fedavgm: server momentum on the mean update "
                                         "(Hsu et al. 2019)")
    trim_fraction: float = option(0.25, "federated: trimmed-mean share cut at each end")
    krum_malicious: int = option(1, "federated: Krum's assumed number of malicious clients")
    partition: str = option("iid", "federated: data split: " + " | ".join(PARTITIONS))
    dirichlet_alpha: float = option(1.0, "federated: Dirichlet label-skew concentration")
    classes_per_client: int = option(2, "federated: classes per client (pathological partition)")
    sample_dp: bool = option(
        False, "federated: sample-level DP: every client trains its D with Opacus under the dp "
               "options (--target-epsilon then covers all rounds); the server reports the "
               "largest client epsilon")
    client_dp: str = option(
        "none", "federated: client-level DP-FedAvg: none | server (clip on the server) | "
                "client (clip on the clients) | poisson (each client joins a round with "
                "probability --fraction-train, clipped on the server, accounted with "
                "amplification by sampling)")
    client_dp_noise: float = option(1.0, "federated: client-level DP noise multiplier")
    client_dp_clip: float = option(1.0, "federated: client-level DP clipping norm of a client's update")
    client_cpus: float = option(1.0, "federated: CPU cores per simulated client (Ray)")
    simulation: str = option(
        "ray", "federated: simulation engine: ray (clients in parallel Ray actors) | inline (every "
               "client in this process, one after another: no per-message cost, for many small "
               "clients)")
    sync: str = option(
        "both", "federated: what the clients train and send: both (G and D, averaged) | d (D "
                "alone; the server trains G against the aggregated D, as Augenstein et al. 2020)")
    client_optimizer: str = option(
        "reset", "federated: a client's Adam state between its rounds: reset (fresh every round) | "
                 "keep (its moments carry over in the node's Flower Context.state)")


@dataclass
class EvalConfig:
    eval_every: int = option(
        1, "compute precision, recall, density, coverage and FID every N epochs (0 = off)")
    eval_samples: int = option(2000, "generated samples per evaluation during training")
    classifier: str = option(
        "", "metric classifier checkpoint (default: the shipped MNIST classifier, used when the "
            "data is 1x28x28 with 10 classes)")
    prdc_k: int = option(3, "k of the k-NN balls for precision, recall, density and coverage")
    pr_curves: bool = option(False, "also compute the PRD curve (Sajjadi et al. 2018) at every "
                                    "evaluation: prd_f8 and prd_f1_8 in the history, the plot in "
                                    "<run>/prd/epoch_NNN.png and TensorBoard")
    best_metric: str = option(
        "fid", "metric that selects the best checkpoint: fid (lowest) | precision | recall | "
               "density | coverage (highest)")


GROUPS = {
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "latent": LatentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "federated": FederatedConfig,
    "eval": EvalConfig,
}

# Options that a resumed run may change; every other change is refused. data_root is where
# the data lives, not what it is: the checkpoint's data fingerprint refuses other data.
RESUMABLE_CHANGES = {"epochs", "progress", "tensorboard", "log_every", "sample_every", "device",
                     "eval_every", "eval_samples", "rounds", "client_cpus", "pr_curves",
                     "simulation", "data_root", "download", "max_data_gb",
                     "max_model_gb"}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError("a config must be a JSON object of option groups")
        unknown_groups = sorted(set(raw) - set(GROUPS))
        problems = [f"unknown option group '{g}' (known: {', '.join(GROUPS)})" for g in unknown_groups]
        groups = {}
        for name, group_cls in GROUPS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                problems.append(f"option group '{name}' must be an object, got {type(values).__name__}")
                continue
            known = {f.name: f.type for f in fields(group_cls)}
            problems += [f"unknown option '{name}.{k}'" for k in sorted(set(values) - set(known))]
            problems += [p for k, v in values.items() if k in known
                         for p in type_problems(k, v, known[k])]
            groups[name] = group_cls(**{k: v for k, v in values.items() if k in known})
        if problems:
            raise ConfigError(problems)
        return cls(**groups)

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return cls.from_dict(parse_json(read_text(path, "config file", MAX_CONFIG_BYTES),
                                        f"config file {path}"))

    def flat(self) -> dict:
        """All options in one dict, keyed by field name (names are unique across groups)."""
        return {k: v for group in self.to_dict().values() for k, v in group.items()}

    def updated(self, overrides: dict) -> "Config":
        """A copy with options replaced by flat name."""
        raw = self.to_dict()
        owners = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}
        unknown = [k for k in overrides if k not in owners]
        if unknown:
            raise ConfigError([f"unknown option '{k}'" for k in unknown])
        for key, value in overrides.items():
            raw[owners[key]][key] = value
        return Config.from_dict(raw)


@dataclass(frozen=True)
class Range:
    """Where a numeric option may lie: finite, within [low, high] (an end excluded when
    open), or exactly 0 where 0 means "off". Upper ends bound what one machine can run."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    zero_means_off: bool = False

    def problem(self, name: str, value) -> Optional[str]:
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        if self.zero_means_off and value == 0:
            return None
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            return f"{flag} must be {self.describe()}, got {shorten(repr(value))}"
        return None


    def describe(self) -> str:
        if self.low == 0 and (self.low_open or self.high == INF):
            text = "positive" if self.low_open else "non-negative"
            if self.high != INF:
                text += f" and {'below' if self.high_open else 'at most'} {self.high:g}"
        else:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        return text + (" or 0 (off)" if self.zero_means_off else "")


INF = math.inf
POSITIVE = Range(0, INF, low_open=True)
NON_NEGATIVE = Range(0, INF)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): betas, decays, dropout
COUNT = Range(1, 10**9)
OFF_OR_COUNT = Range(1, 10**9, zero_means_off=True)

# Every int and float option's range (tests/test_config.py checks that none is missing).
# The upper ends of sizes refuse what cannot run on one machine before anything is built.
RANGES: dict[str, Range] = {
    # data
    "holdout_fraction": Range(0, 1, low_open=True, high_open=True),
    "limit": Range(1, 10**9, zero_means_off=True),
    "image_size": Range(4, 1024, zero_means_off=True),
    "max_data_gb": POSITIVE,
    # model
    "g_width": Range(1, 2048), "d_width": Range(1, 2048),
    "g_depth": Range(1, 12, zero_means_off=True), "d_depth": Range(1, 12, zero_means_off=True),
    "d_dropout": FRACTION, "instance_noise": Range(0, 100),
    "maxout_pieces": Range(1, 64), "label_embed_dim": Range(1, 4096), "max_model_gb": POSITIVE,
    # objective
    "n_critic": Range(1, 10_000, zero_means_off=True),
    "d_steps_threshold": Range(0, 1, low_open=True, high_open=True),
    "d_steps_grace": Range(0, 10**9), "d_steps_beta": FRACTION,
    "mode_seeking": Range(0, 1e6), "aux_classifier": Range(0, 1e6),
    "clip_value": Range(0, 1e6, low_open=True), "gp_weight": Range(0, 1e6),
    "label_smoothing": Range(0, 0.5, high_open=True),
    "real_label_min": Range(0, 1), "real_label_max": Range(0, 1),
    "fake_label_min": Range(0, 1), "fake_label_max": Range(0, 1),
    # latent
    "latent_dim": Range(1, 4096), "latent_sigma": Range(0, 100, low_open=True),
    "truncation": Range(0.1, 100, zero_means_off=True),
    "mixture_components": Range(1, 10_000), "mixture_sigma_init": Range(0, 100, low_open=True),
    "mixture_sigma_reg": Range(0, 1e6),
    # optim
    "g_lr": Range(0, 10, low_open=True), "d_lr": Range(0, 10, low_open=True),
    "g_beta1": FRACTION, "g_beta2": FRACTION, "d_beta1": FRACTION, "d_beta2": FRACTION,
    "lr_gamma": Range(0, 1, low_open=True), "ema_decay": FRACTION,
    # train
    "epochs": Range(1, 100_000), "batch_size": Range(1, 10**6), "seed": Range(0, 2**32 - 1),
    "sample_every": COUNT, "log_every": COUNT, "checkpoint_every": OFF_OR_COUNT,
    # privacy: an epsilon below 0.01 is noise the accountants cannot find in finite time
    "target_epsilon": Range(0.01, 100, zero_means_off=True),
    "noise_multiplier": Range(0, 1e6, low_open=True),
    "delta": Range(0, 1, low_open=True, high_open=True, zero_means_off=True),
    "max_grad_norm": Range(0, 1e6, low_open=True),
    "physical_batch_size": OFF_OR_COUNT,
    # federated
    "clients": Range(1, 10**6), "rounds": Range(1, 10**6), "local_steps": Range(1, 10**7),
    "fraction_train": Range(0, 1, low_open=True), "min_clients": Range(0, 10**6),
    "proximal_mu": Range(0, 1e6), "server_lr": Range(0, 100, low_open=True),
    "server_step": Range(0, 1e6, low_open=True), "server_momentum": FRACTION,
    "trim_fraction": Range(0, 0.5, high_open=True), "krum_malicious": Range(0, 10**6),
    "dirichlet_alpha": Range(0, 1e6, low_open=True), "classes_per_client": Range(1, 1000),
    "client_dp_noise": Range(0, 1e6), "client_dp_clip": Range(0, 1e6, low_open=True),
    "client_cpus": Range(0, 1024, low_open=True),
    # eval
    "eval_every": Range(0, 10**9), "eval_samples": Range(1, 10**6), "prdc_k": Range(1, 1000),
}


def range_problems(config: "Config") -> list[str]:
    return [problem for group in config.to_dict().values() for name, value in group.items()
            if name in RANGES and (problem := RANGES[name].problem(name, value))]


def type_problems(name: str, value: Any, kind: type) -> list[str]:
    """A JSON value against its option's type: no "1" for an int, no 1.5 epochs, no
    "false" that Python would read as true, no null learning rate."""
    # bool is a subclass of int in Python, so true/false are refused where a number belongs.
    accepted = {bool: ((bool,), "true or false"), int: ((int,), "a whole number"),
                float: ((int, float), "a number"), str: ((str,), "a string")}
    if kind not in accepted:
        return []
    types, what = accepted[kind]
    if isinstance(value, types) and (kind is bool or not isinstance(value, bool)):
        return []
    shown = (json.dumps(value) if isinstance(value, (str, int, float, bool, type(None)))
             else type(value).__name__)
    return [f"--{name.replace('_', '-')} must be {what}, got {shown}"]


def federated_problems(f: FederatedConfig) -> list[str]:
    problems = []
    for value, allowed, what in [(f.strategy, STRATEGIES, "strategy"), (f.partition, PARTITIONS, "partition"),
                                 (f.client_dp, CLIENT_DP, "client-dp"),
                                 (f.client_optimizer, CLIENT_OPTIMIZERS, "client optimizer"),
                                 (f.sync, SYNCS, "sync"), (f.simulation, SIMULATIONS, "simulation")]:
        if value not in allowed:
            problems.append(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")
    if f.client_dp == "poisson" and f.strategy != "fedavg":
        problems.append(f"--client-dp poisson is its own DP-FedAvg; it cannot run with strategy "
                        f"'{f.strategy}' (use fedavg)")
    if f.min_clients > f.clients:
        problems.append(f"min-clients ({f.min_clients}) cannot exceed clients ({f.clients})")
    if f.client_dp != "none" and f.strategy not in ("fedavg", "fedprox"):
        problems.append(f"client-level DP adds noise to a FedAvg-style mean; it does not compose "
                        f"with strategy '{f.strategy}' (use fedavg or fedprox)")
    return problems


def run_name_problem(name: str) -> Optional[str]:
    """A run name is one folder name: nothing that leaves --out-dir."""
    if (name in (".", "..") or any(c in name for c in "/\\") or len(name) > 200
            or any(ord(c) < 32 for c in name)):
        return f"--name must be one folder name (no '/', no '..'), got '{shorten(name)}'"
    return None


def n_critic(config: Config) -> int:
    if config.objective.n_critic:
        return config.objective.n_critic
    from gankit.objectives import OBJECTIVES  # late: objectives imports torch

    return OBJECTIVES[config.objective.loss].default_n_critic


def validate(config: Config, num_classes: Optional[int] = None) -> None:
    """Collect every invalid option and raise one ConfigError naming them all.

    `num_classes` is known once data is loaded; pass it to check conditional models.
    """
    from gankit.objectives import OBJECTIVES  # late: objectives imports torch

    m, o, z, opt, t, e = (config.model, config.objective, config.latent, config.optim,
                          config.train, config.eval)
    problems = range_problems(config)

    def choice(value, allowed, what):
        if value not in allowed:
            problems.append(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")

    choice(m.g_arch, GENERATOR_ARCHS, "generator")
    choice(m.d_arch, DISCRIMINATOR_ARCHS, "discriminator")
    choice(m.g_norm, G_NORMS, "generator normalization")
    choice(m.d_norm, D_NORMS, "discriminator normalization")
    choice(m.conditioning, CONDITIONINGS, "conditioning")
    choice(o.loss, tuple(OBJECTIVES), "loss")
    choice(z.prior, PRIORS, "prior")
    choice(z.fake_labels, FAKE_LABELS, "fake-labels")
    if z.fake_labels == "data" and privacy_facts(config)["sample_level"]:
        problems.append("--fake-labels data draws fakes with the training labels' class "
                        "frequencies, which sample-level DP does not account for; use uniform "
                        "(client-level DP covers it: the frequencies stay inside the clipped update)")
    choice(opt.lr_decay, LR_DECAYS, "lr decay")
    choice(t.mode, MODES, "mode")
    if run_name_problem(t.name):
        problems.append(run_name_problem(t.name))
    choice(t.device, DEVICES, "device")
    p = config.privacy
    choice(p.accountant, ACCOUNTANTS, "accountant")
    choice(e.best_metric, tuple(BEST_METRICS), "best metric")
    choice(p.grad_sample_mode, GRAD_SAMPLE_MODES, "grad sample mode")
    choice(p.fake_gradients, FAKE_GRADIENTS, "fake-gradients")
    if p.fake_gradients == "public" and p.grad_sample_mode != "bk":
        problems.append("--fake-gradients public needs --grad-sample-mode bk (Opacus' modes clip "
                        "every pass through D)")
    if t.mode == "dp" or (t.mode == "federated" and config.federated.sample_dp):
        problems += dp_problems(config)
    problems += federated_problems(config.federated)


    smoothing = o.label_smoothing or (o.real_label_min, o.real_label_max, o.fake_label_min,
                                      o.fake_label_max) != (1.0, 1.0, 0.0, 0.0)
    if smoothing and o.loss in OBJECTIVES and not OBJECTIVES[o.loss].uses_targets:
        problems.append(f"label smoothing and soft labels apply to bce and lsgan, not '{o.loss}'")
    if o.aux_classifier and not m.conditional:
        problems.append("aux-classifier trains D to predict labels: add --conditional")
    elif o.aux_classifier and m.d_arch == "cdcgan":
        problems.append("aux-classifier needs a discriminator with an output head (dcgan, mlp or "
                        "maxout); the cdcgan discriminator ends in a convolution")
    if o.label_smoothing and (o.real_label_min, o.real_label_max) != (1.0, 1.0):
        problems.append("give either label-smoothing or a real label range, not both")
    if o.real_label_min > o.real_label_max or o.fake_label_min > o.fake_label_max:
        problems.append("soft label ranges need min <= max")
    if m.conditional and num_classes is not None and num_classes < 2:
        problems.append("a conditional model needs labelled data with at least 2 classes; "
                        "this dataset has no labels")
    if m.d_norm == "instance" and m.d_arch in ("mlp", "maxout"):
        problems.append(f"instance normalization needs feature maps; the {m.d_arch} discriminator "
                        "has vectors (use layer, group or none)")
    if m.spectral_norm and o.loss in OBJECTIVES and OBJECTIVES[o.loss].clip_weights:
        problems.append("wgan clips weights; spectral-norm and clipping together are not supported "
                        "(use wgan-gp or hinge with spectral norm)")
    choice(o.d_steps_schedule, D_STEPS_SCHEDULES, "d-steps-schedule")
    for arch, norm, flag in [(m.g_arch, m.g_norm, "g-norm"), (m.d_arch, m.d_norm, "d-norm")]:
        if arch == "cdcgan" and norm != "none":
            problems.append(f"the cdcgan networks have no normalization layers: add --{flag} none "
                            "(or start from --preset dp-record)")
    if "cdcgan" in (m.g_arch, m.d_arch) and not m.conditional:
        problems.append("the cdcgan networks are class-conditional: add --conditional")
    if problems:
        raise ConfigError(problems)


def dp_problems(config: "Config") -> list[str]:
    """Options the dp mode cannot support, each with the reason and an alternative (what
    Opacus finds in a built network is toolkit/privacy.py's module_problems)."""
    from gankit.objectives import OBJECTIVES  # late: objectives imports torch

    m, o, p = config.model, config.objective, config.privacy
    problems = []
    if m.d_norm == "batch":
        problems.append(
            "dp: --d-norm batch mixes samples (each output depends on the whole batch, and its "
            "running statistics are not private), so a per-sample gradient does not bound one "
            "example's influence; use --d-norm group (the default), layer, instance or none")
    if m.spectral_norm:
        problems.append(
            "dp: --spectral-norm keeps power-iteration vectors as buffers of every layer and "
            "computes the weights through a parametrization: Opacus' hooks and functorch modes "
            "refuse layers with buffers, and ew fails on the parametrization; drop it (GroupNorm "
            "D) or use --loss wgan, whose weight clipping is post-processing of the private "
            "weights")
    if o.loss in OBJECTIVES and OBJECTIVES[o.loss].gradient_penalty:
        problems.append(
            f"dp: --loss {o.loss} differentiates D twice (the penalty's grad_x D(x_hat) with "
            "create_graph), and Opacus' per-sample gradients cover one first-order backward "
            "pass: hooks and functorch fail, ew returns wrong per-sample gradients (and has no "
            "double backward for GroupNorm); use --loss wgan (weight clipping), hinge or bce")
    if p.secure_mode:
        reason = ("torchcsprng is not installed (there is no build of it for this torch)"
                  if importlib.util.find_spec("torchcsprng") is None else
                  "a cryptographic generator cannot be seeded, and the dp mode seeds sampling "
                  "and noise so that runs are reproducible and resume exactly")
        problems.append(
            f"dp: --secure-mode is not supported: {reason}; use the default (seeded) mode and "
            "keep the seed, config.json and checkpoints of a released model private")
    return problems


def privacy_facts(config: "Config") -> dict:
    """What a run protects, decided once when its first checkpoint is written and read back
    from the checkpoint by everything that must refuse to spend real data outside the
    guarantee (a DRS calibration, say). Sample level: each training image (the dp mode,
    or --sample-dp in every federated client); client level: each client's whole data
    (--client-dp)."""
    t, f = config.train, config.federated
    sample = t.mode == "dp" or (t.mode == "federated" and f.sample_dp)
    client = t.mode == "federated" and f.client_dp != "none"
    protects = [what for on, what in ((sample, "each training image"),
                                      (client, "each client's whole data")) if on]
    return {"private": sample or client, "sample_level": sample, "client_level": client,
            "protects": " and ".join(protects) or "nothing (not private)"}
