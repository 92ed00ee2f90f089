"""Splitting the local training data among federated clients, seeded.

Three schemes, as in the federated-learning literature:

    iid            a seeded shuffle cut into near-equal shares
    dirichlet      label skew: each class is divided among the clients in proportions drawn
                   from Dirichlet(alpha) (Hsu et al. 2019); small alpha = a few classes per
                   client, large alpha = close to IID
    pathological   each client holds `classes_per_client` classes, split in equal shards
                   (McMahan et al. 2017's "2 shards per client" when classes_per_client=2)

Each returns one index tensor per client into the training set. Every client gets at
least `min_size` images: a Dirichlet draw that leaves a client smaller is redrawn (the
usual practice), so that every client can fill a batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from gankit.errors import ConfigError
from gankit.files import make_folder, save_figure, write_text

SCHEMES = ("iid", "dirichlet", "pathological")


def partition(n: int, labels: Optional[Tensor], num_clients: int, scheme: str = "iid",
              alpha: float = 1.0, classes_per_client: int = 2, seed: int = 0,
              min_size: int = 1) -> list[Tensor]:
    """Indices of each client's share of n images (labels: one int per image, or None)."""
    if num_clients < 1:
        raise ConfigError(f"the number of clients must be at least 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ConfigError(f"{n} training images cannot give {num_clients} clients "
                          f"{min_size} images each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [torch.from_numpy(np.sort(part)) for part in
                np.array_split(rng.permutation(n), num_clients)]
    if labels is None:
        raise ConfigError(f"the '{scheme}' partition splits by label; this data has no labels")
    y = labels.cpu().numpy()
    if scheme == "dirichlet":
        return _dirichlet(y, num_clients, alpha, rng, min_size)
    if scheme == "pathological":
        return _pathological(y, num_clients, classes_per_client, rng, min_size)
    raise ConfigError(f"unknown partition '{scheme}' (choose from {', '.join(SCHEMES)})")


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float, rng, min_size: int) -> list[Tensor]:
    if alpha <= 0:
        raise ConfigError(f"the Dirichlet alpha must be positive, got {alpha}")
    classes = np.unique(y)
    for _ in range(1000):
        shares = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [torch.tensor(sorted(s), dtype=torch.long) for s in shares]
    raise ConfigError(f"Dirichlet(alpha={alpha}) left some of the {num_clients} clients with fewer "
                      f"than {min_size} images in 1,000 draws; raise alpha or use fewer clients")


def _pathological(y: np.ndarray, num_clients: int, k: int, rng, min_size: int) -> list[Tensor]:
    classes = np.unique(y)
    if not 1 <= k <= len(classes):
        raise ConfigError(f"classes per client must be between 1 and {len(classes)}, got {k}")
    # Deal classes round-robin from a shuffled, repeated list so that each client gets k
    # distinct classes and every class is held by about the same number of clients.
    order = np.concatenate([rng.permutation(classes) for _ in range(-(-num_clients * k // len(classes)))])
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        picked = order[client * k:(client + 1) * k]
        if len(set(picked.tolist())) < k:  # a repeat at a permutation seam: pick distinct ones
            picked = rng.choice(classes, size=k, replace=False)
        for c in picked:
            owners[int(c)].append(client)
    shares = [[] for _ in range(num_clients)]
    for c, holders in owners.items():
        if not holders:
            continue  # more classes than client slots: this class is left out
        members = rng.permutation(np.flatnonzero(y == c))
        for client, shard in zip(holders, np.array_split(members, len(holders))):
            shares[client].extend(shard.tolist())
    if min(len(s) for s in shares) < min_size:
        raise ConfigError(f"the pathological partition left a client with fewer than {min_size} images")
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shares]


def class_histogram(labels: Optional[Tensor], parts: list[Tensor], num_classes: int) -> list[list[int]]:
    """Images per class for each client (one row per client)."""
    if labels is None:
        return [[len(p)] for p in parts]
    return [torch.bincount(labels[p], minlength=num_classes).tolist() for p in parts]


def histogram_table(histogram: list[list[int]]) -> str:
    """The per-client class histogram as aligned text, for the log."""
    width = max(5, *(len(str(v)) for row in histogram for v in row))
    head = "client " + " ".join(f"{c:>{width}}" for c in range(len(histogram[0]))) + "  total"
    lines = [head] + [f"{i:>6} " + " ".join(f"{v:>{width}}" for v in row) + f"  {sum(row):>5}"
                      for i, row in enumerate(histogram)]
    return "\n".join(lines)


def save_histogram(path: Path, histogram: list[list[int]], scheme: str, **details) -> None:
    """partition.json (the counts) and partition.png (a stacked bar per client)."""
    make_folder(path)
    write_text(Path(path) / "partition.json", json.dumps(
        {"scheme": scheme, **details, "class_counts": histogram}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(histogram)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(counts) + 2), 3))
    bottom = np.zeros(len(counts))
    for c in range(counts.shape[1]):
        ax.bar(range(len(counts)), counts[:, c], bottom=bottom, label=str(c), color=plt.cm.tab10(c % 10))
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("images")
    ax.set_title(f"partition: {scheme}", fontsize=9)
    if counts.shape[1] > 1:
        ax.legend(title="class", fontsize=6, title_fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1),
                  loc="upper left")
    fig.tight_layout()
    save_figure(fig, Path(path) / "partition.png", dpi=110)
    plt.close(fig)
