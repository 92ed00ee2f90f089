"""Named starting points: the recipes the project measured as its best (`gankit train --preset
NAME`; `gankit presets` lists them with their results).

Precedence: defaults < preset < --config FILE < options on the command line; the run's
config.json records the resolved options, so a run never depends on a preset's later edits.

Each preset names the study row it came from and the numbers that row measured; a test
checks that the options are that row's and that the numbers are its committed table's, so a
preset cannot drift from its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gankit.errors import ConfigError


@dataclass(frozen=True)
class Evidence:
    """A committed result: `experiments/results/<study>/table.csv`, row `row`, whose columns
    hold `values` (rounded as shown)."""
    study: str
    row: str
    values: dict


@dataclass(frozen=True)
class Preset:
    options: dict
    purpose: str
    result: str = ""  # what it measured: the number, the data, the hardware and the time
    command: str = ""  # what reproduces it
    study_config: str = ""  # experiments/configs/<file>.json whose row `evidence[0].row` it is
    evidence: tuple[Evidence, ...] = field(default=())


# The private full-MNIST recipe: the class-conditional DCGAN of width 16 with projection labels
# and GroupNorm in D, an auxiliary classifier and the mode-seeking term, batch 1024 with book-keeping
# clipping, the noise planned for the target over 60 epochs (RDP), EMA of G.
DP_MNIST = {
    "mode": "dp", "dataset": "mnist", "target_epsilon": 10.0, "delta": 1e-5, "accountant": "rdp",
    "grad_sample_mode": "bk", "fake_gradients": "paired", "conditional": True,
    "conditioning": "projection", "d_norm": "group", "g_width": 16, "d_width": 16, "n_critic": 1,
    "batch_size": 1024, "epochs": 60, "mode_seeking": 0.3, "aux_classifier": 1.0,
    "ema_decay": 0.999, "eval_every": 5, "checkpoint_every": 20,
}

# Cross-silo federation (4 clients): each client's learning rate scaled by the number of
# clients (4 x 2e-4) and fakes drawn with the client's own label frequencies.
FEDERATED_SILO = {
    "mode": "federated", "conditional": True, "loss": "bce", "g_width": 32, "d_width": 32,
    "batch_size": 64, "clients": 4, "rounds": 20, "local_steps": 50, "strategy": "fedavg",
    "n_critic": 2, "g_lr": 8e-4, "d_lr": 8e-4, "fake_labels": "data", "simulation": "inline",
}

# 1,000 users with client-level DP: each joins a round with probability 0.1 (Poisson DP-FedAvg),
# D alone trains on the clients and G on the server, updates clipped at 0.05, noise 1.1.
FEDERATED_USERS_DP = {
    "mode": "federated", "dataset": "mnist", "conditional": True, "loss": "bce", "g_width": 16,
    "d_width": 8, "batch_size": 32, "clients": 1000, "fraction_train": 0.1, "rounds": 200,
    "local_steps": 10, "sync": "d", "partition": "iid", "strategy": "fedavg",
    "simulation": "inline", "client_dp": "poisson", "client_dp_noise": 1.1, "client_dp_clip": 0.05,
    "mode_seeking": 0.3, "eval_every": 20, "eval_samples": 1000, "sample_every": 20,
}

PRESETS: dict[str, Preset] = {
    "quickstart": Preset(
        {"conditional": True, "ema_decay": 0.999},
        "the first run: a class-conditional DCGAN with an EMA of G, offline data",
        "FID 25.3, precision 0.62, recall 0.49 on the offline 4,500 mnist-5k images, 10 epochs, "
        "about 2 minutes on 2 CPU cores; every digit in 6.8-14.2% of 10,000 samples",
        "gankit train --preset quickstart --epochs 10 --name quickstart"),
    "dp-mnist": Preset(
        DP_MNIST,
        "differentially private MNIST generator (epsilon 10 by default; --target-epsilon 1 for "
        "epsilon 1), the product's best private recipe",
        "downstream accuracy 95.2% and 95.7% (two seeds) at epsilon 10, 92.0% and 91.6% at "
        "epsilon 1 (delta 1e-5, RDP) on full MNIST (60,000 images), a CNN trained on 60,000 "
        "generated images and tested once on the real test split; about 1.9 h per run on one "
        "CPU thread",
        "gankit train --preset dp-mnist --data-root PATH/TO/MNIST --name dp-eps10",
        "dp_mnist_cpu",
        (Evidence("dp_mnist", "eps10-dcgan-w16-b1024-proj-group-ms0.3-ac1-e60",
                  {"downstream_accuracy": 0.952, "epsilon": 10.0, "seed": 1}),
         Evidence("dp_mnist", "eps10-dcgan-w16-b1024-proj-group-ms0.3-ac1-e60-seed2",
                  {"downstream_accuracy": 0.957, "epsilon": 10.0, "seed": 2}),
         Evidence("dp_mnist", "eps1-dcgan-w16-b1024-proj-group-ms0.3-ac1-e60",
                  {"downstream_accuracy": 0.920, "epsilon": 1.0, "seed": 1}),
         Evidence("dp_mnist", "eps1-dcgan-w16-b1024-proj-group-ms0.3-ac1-e60-seed2",
                  {"downstream_accuracy": 0.916, "epsilon": 1.0, "seed": 2}))),
    "federated-silo": Preset(
        FEDERATED_SILO,
        "a few clients (silos) at the quality of centralized training, IID or label-skewed",
        "FID 8.4 (IID) and 8.8 and 9.6 (Dirichlet 0.1 label skew, two seeds) against 8.6 and 7.5 "
        "for centralized training of the same networks and steps; mnist-5k, 4 clients, 20 rounds, "
        "7 to 12 minutes on the CPU",
        "gankit train --preset federated-silo --partition dirichlet --dirichlet-alpha 0.1",
        "federated_parity_small",
        (Evidence("federated_parity", "iid-lr4-datalabels", {"fid": 8.4}),
         Evidence("federated_parity", "dir0.1-lr4-datalabels", {"fid": 8.8}),
         Evidence("federated_parity", "dir0.1-lr4-datalabels-seed1", {"fid": 9.6}),
         Evidence("federated_parity", "centralized", {"fid": 8.6}),
         Evidence("federated_parity", "centralized-seed1", {"fid": 7.5}))),
    "federated-users-dp": Preset(
        FEDERATED_USERS_DP,
        "1,000 users with user-level (client-level) DP: no single user's whole data is exposed",
        "downstream accuracy 85.2% at client-level epsilon 9.25 (delta 1e-5, RDP, amplified by "
        "Poisson sampling) on full MNIST split among 1,000 users of 60 images, 200 rounds, "
        "40 minutes on 2 CPU cores",
        "gankit train --preset federated-users-dp --data-root PATH/TO/MNIST",
        "federated_client_dp",
        (Evidence("federated_client_dp", "cdp-1000c-q0.1-z1.1-c0.05-ms0.3",
                  {"downstream_accuracy": 0.852, "epsilon": 9.25}),)),
    "dp-record": Preset(
        {"g_arch": "cdcgan", "d_arch": "cdcgan", "conditional": True, "g_norm": "none",
         "d_norm": "none", "g_width": 128, "d_width": 128, "latent_dim": 128,
         "g_lr": 2e-4, "d_lr": 2e-4, "g_beta1": 0.5, "d_beta1": 0.5, "g_beta2": 0.999,
         "d_beta2": 0.999, "loss": "bce", "max_grad_norm": 1.0, "accountant": "rdp",
         "d_steps_schedule": "adaptive", "n_critic": 1, "d_steps_threshold": 0.6,
         "d_steps_grace": 200, "d_steps_beta": 0.99},
        "Bie et al. 2023's DP-GAN record recipe (\"Private GANs, revisited\": MNIST at epsilon "
        "10, 95.0% downstream), with the adaptive D-step ladder; sized for a GPU budget. Add "
        "--mode dp and --target-epsilon; on a CPU, dp-mnist reaches more",
        "not reproduced here: FID 295 after 5 epochs on the CPU, where dp-mnist's rows were "
        "kept instead"),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)}; "
                          "gankit presets describes them)")
    return dict(PRESETS[name].options)


def as_flags(options: dict) -> list[str]:
    """Options as the command line spells them."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return flags


def describe() -> str:
    """Every preset: what it is for, what it measured, the command that reproduces it."""
    blocks = []
    for name, p in PRESETS.items():
        lines = [f"{name}: {p.purpose}"]
        if p.result:
            lines.append(f"  measured: {p.result}")
        if p.command:
            lines.append(f"  run: {p.command}")
        lines.append(f"  sets: {' '.join(as_flags(p.options))}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
