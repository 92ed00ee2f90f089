"""Hostile and broken dataset and classifier files: each is refused with one DataError or
UserError line, before its declared size is read or decompressed, without creating folders,
and within bounded time and memory. Every file is built under tmp_path."""

import io
import os
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch

from gankit import cli
from gankit.config import DataConfig
from gankit.data import check_labels, load_data, load_folder, load_npz, scan_image_folder
from gankit.errors import DataError, UserError
from gankit.metrics import classifier as metric

MiB = 1 << 20


def tree(folder):
    """Every path under `folder`, links not followed: what a call may not change."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def bounded(call):
    """(exception info, seconds, peak traced bytes) of `call`, which must raise a UserError."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserError) as err:
            call()
        return err, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def deflate_zeros(prefix: bytes, zeros: int, wbits: int) -> bytes:
    """A deflate stream (wbits -15: raw, as in zip; 31: gzip) of `prefix` then `zeros` zero
    bytes, built in milliseconds: after a full flush the compressor starts afresh, so each
    further MiB of zeros compresses to the same block. A gzip trailer's CRC is left wrong;
    readers check it only after decompressing everything."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH) == block
    blocks, rest = divmod(zeros, MiB)
    return head + block * blocks + c.compress(bytes(rest)) + c.flush()


def npy_header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_zip(path, name: str, data: bytes, size: int) -> None:
    """A one-member zip whose member is the raw deflate stream `data` of `size` bytes (the CRC
    is 0: it is checked only after decompressing everything)."""
    name_b = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, 0, len(data), size, len(name_b), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, 0, len(data), size,
                          len(name_b), 0, 0, 0, 0, 0, 0)
    offset = len(local) + len(name_b) + len(data)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name_b), offset, 0)
    path.write_bytes(local + name_b + data + central + name_b + end)


BOMB_SHAPE = (3_200_000, 28, 28)  # 2.5 GB of uint8, 10 GB as float32 pixels


@pytest.fixture
def npz_bomb(tmp_path):
    path = tmp_path / "bomb.npz"
    header = npy_header(BOMB_SHAPE)
    write_zip(path, "x.npy", deflate_zeros(header, int(np.prod(BOMB_SHAPE)), -15),
              len(header) + int(np.prod(BOMB_SHAPE)))
    return path


def refused_by_cli(capsys, *argv) -> str:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("gankit: error:"), err
    return lines[0]


# --- 1. Nothing is downloaded or created unless asked ----------------------------------------

def test_a_mistyped_data_root_downloads_nothing_and_creates_no_folder(tmp_path, monkeypatch):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision was asked to download")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    root = tmp_path / "shared" / "data" / "mnst"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="mnist", data_root=str(root)))
    message = one_line(err)
    assert f"'{root}'" in message and "--download" in message and "--dataset mnist-5k" in message
    with pytest.raises(DataError, match="--download"):
        metric.training_and_test_data("mnist", str(root), str(root))
    assert not root.exists() and tree(tmp_path) == before

    # Asked to download, offline: torchvision created its folders, and they are removed again.
    def offline(root_arg, train, download):
        os.makedirs(os.path.join(root_arg, "MNIST", "raw"), exist_ok=True)
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_data(DataConfig(dataset="mnist", data_root=str(root), download=True))
    assert not root.exists() and tree(tmp_path) == before


# --- 2. Declared sizes are checked before reading: npz and image folders ---------------------

def test_an_npz_zip_bomb_is_refused_from_its_header_fast_and_small(npz_bomb):
    assert npz_bomb.stat().st_size < 3 * MiB  # holds 2.5 GB of zeros
    err, seconds, peak = bounded(lambda: load_npz(npz_bomb, max_gb=8.0))
    message = one_line(err)
    assert "10 GB" in message and "--max-data-gb 8" in message and str(BOMB_SHAPE) in message
    assert seconds < 2 and peak < 16 * MiB, (seconds, peak)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.array([b"a"] * 4)}, "numeric arrays ('x' has dtype |S1)"),
    ({"x": np.zeros((4, 8, 8), [("r", "u1"), ("g", "u1")])}, "numeric arrays ('x' has dtype"),
    ({"x": np.zeros((4, 8, 8), np.int32)}, "'x' must be uint8"),
    ({"x": np.full((4, 8, 8), np.nan, np.float32)}, "'x' must be uint8"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.float32)}, "non-negative integer"),
])
def test_npz_members_of_the_wrong_kind_are_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_npz(tmp_path / "d.npz")
    assert message in one_line(err)


def test_an_npz_member_longer_or_shorter_than_its_header_is_refused(tmp_path):
    import zipfile

    header = npy_header((4, 8, 8))
    for name, data, expected in (("long.npz", bytes(4 * 64 + 1), "more data than its header"),
                                 ("short.npz", bytes(100), "ends before")):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("x.npy", header + data)
        with pytest.raises(DataError) as err:
            load_npz(tmp_path / name)
        assert expected in one_line(err)
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as archive:
        archive.writestr("x", b"not an npy array")  # np.load would hand back raw bytes
    with pytest.raises(DataError, match="numeric arrays"):
        load_npz(tmp_path / "raw.npz")


def png_header(width: int, height: int) -> bytes:
    """A grey PNG that declares width x height pixels but holds none: PIL opens it lazily."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def image_folder(root, classes=("a", "b"), n=3, side=64):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((side, side), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("side", [20_000, 10_000])  # PIL's error (over 2x its limit), its warning
def test_a_decompression_bomb_image_is_one_line(tmp_path, side):
    root = image_folder(tmp_path / "imgs")
    (root / "b" / "huge.png").write_bytes(png_header(side, side))
    for action in ("default", "error"):  # also with warnings turned into errors
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            with pytest.raises(DataError) as err:
                load_data(DataConfig(dataset=f"folder:{root}"))
        message = one_line(err)
        assert "huge.png" in message and "pixels" in message


def test_a_folder_over_the_cap_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    root = image_folder(tmp_path / "imgs")  # 6 grey 64x64 images: 98,304 bytes as float32

    def no_decoding(self):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset=f"folder:{root}", max_data_gb=5e-5))
    message = one_line(err)
    assert "6 images" in message and "9.83e-05 GB" in message and "--max-data-gb 5e-05" in message
    monkeypatch.undo()
    x, y = load_folder(root, max_gb=1e-4)  # within the cap
    assert x.shape == (6, 1, 64, 64) and y.tolist() == [0, 0, 0, 1, 1, 1]


# --- Image folders follow no symbolic link --------------------------------------------------

@pytest.mark.parametrize("link, target", [
    ("a/loop", "."),                  # a circle: ImageFolder walks it until the path is too long
    ("a/up", ".."),                   # the dataset again, inside itself
    ("a/secret.png", "../../secret.png"),  # a file outside the folder
    ("c", "../outside"),              # a whole class folder outside
])
def test_symbolic_links_in_an_image_folder_are_refused(tmp_path, link, target):
    root = image_folder(tmp_path / "imgs")
    image_folder(tmp_path / "outside", classes=("x",))
    (tmp_path / "secret.png").write_bytes((root / "a" / "0.png").read_bytes())
    (root / link).symlink_to(target)
    before = tree(tmp_path)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset=f"folder:{root}"))
    message = one_line(err)
    assert f"{root / link} is a symbolic link" in message
    assert time.perf_counter() - start < 2 and tree(tmp_path) == before


def test_the_folder_scan_lists_what_imagefolder_lists(tmp_path):
    """Same classes, order, class indices and extensions as torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    root = tmp_path / "imgs"
    files = ["b/2.png", "b/10.PNG", "b/sub/1.jpg", "b/notes.txt", "a/z/y/x.bmp", "a/0.webp",
             "a/1.tiff", "a/.hidden.png", "c d/ä.jpeg", ".cls/0.png"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "top.png").write_bytes(b"")  # a file beside the class folders is not a sample
    folder = ImageFolder(str(root))
    classes, samples = scan_image_folder(root)
    assert classes == folder.classes and samples == folder.samples and len(samples) == 9


# --- 3. IDX files: headers, declared sizes, gzip bombs --------------------------------------

def idx(shape, payload: bytes = None, type_code=0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return header + (bytes(int(np.prod(shape))) if payload is None else payload)


@pytest.fixture
def idx_root(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        (root / f"{split}-images-idx3-ubyte").write_bytes(idx((n, 8, 8)))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx((n,), bytes(range(n))))
    return root


@pytest.mark.parametrize("name, content, message", [
    ("train-images-idx3-ubyte", idx((1,) * 255), "declares 255 dimensions (1 to 4 expected)"),
    ("train-images-idx3-ubyte", idx((20, 8, 8), bytes(100)),
     "declares 1,280 bytes of data, the file holds 100 bytes"),
    ("train-images-idx3-ubyte", idx((20, 8, 8), bytes(1281)), "the file holds more"),
    ("train-images-idx3-ubyte", idx((2**32 - 1,) * 3, b""), "--max-data-gb 8"),
    ("train-images-idx3-ubyte", idx((20, 8, 8), type_code=0x0D), "not an IDX file of unsigned bytes"),
    ("train-images-idx3-ubyte", idx((20, 64)), "expected 3 dimensions"),
    ("train-labels-idx1-ubyte", idx((19,)), "declares shape (19,), expected shape (20,)"),
    ("train-labels-idx1-ubyte", idx((20, 2)), "expected shape (20,), one label per image"),
])
def test_malformed_idx_files_are_one_line(idx_root, name, content, message):
    (idx_root / name).write_bytes(content)
    err, seconds, peak = bounded(lambda: load_data(DataConfig(dataset="mnist", data_root=str(idx_root))))
    assert message in one_line(err) and seconds < 2 and peak < 16 * MiB, (seconds, peak)


def test_an_idx_gzip_bomb_is_read_no_further_than_its_header_declares(idx_root):
    bomb = deflate_zeros(idx((20, 8, 8), b""), 2 * 10**9, 31)  # 2 GB of zeros after the header
    (idx_root / "train-images-idx3-ubyte").unlink()
    (idx_root / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    assert len(bomb) < 3 * MiB
    err, seconds, peak = bounded(lambda: load_data(DataConfig(dataset="mnist", data_root=str(idx_root))))
    assert "declares 1,280 bytes of data, the file holds more" in one_line(err)
    assert seconds < 2 and peak < 16 * MiB, (seconds, peak)


def test_both_idx_splits_together_are_checked_against_the_cap(idx_root):
    # 20 + 10 images of 8x8: 5,120 + 2,560 bytes as float32; each alone is under 6,000.
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="mnist", data_root=str(idx_root), max_data_gb=6e-6))
    assert "1,920 pixels" in one_line(err) and "--max-data-gb 6e-06" in one_line(err)
    data = load_data(DataConfig(dataset="mnist", data_root=str(idx_root), max_data_gb=8e-6))
    assert data.train_x.shape == (20, 1, 8, 8) and data.train_y.tolist() == list(range(20))


# --- 4. Labels are range-checked before any cast --------------------------------------------

@pytest.mark.parametrize("y, message", [
    (np.array([0, 1, 2, 2**64 - 1], np.uint64), "label 18446744073709551615 means"),
    (np.array([0, 1, 2, 2**32 - 1], np.uint32), "label 4294967295 means 4,294,967,296 classes"),
    (np.array([0, 1, 2, -1], np.int64), "label -1 is negative"),
    (np.array([0, 1, 2, -128], np.int8), "label -128 is negative"),
    (np.array([0, 1, 2, 1000], np.int16), "label 1000 means 1,001 classes"),
])
def test_labels_out_of_range_are_refused_in_their_own_dtype(tmp_path, y, message):
    assert np.array([2**64 - 1], np.uint64).astype(np.int64)[0] == -1  # why a cast must come last
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=y)
    with pytest.raises(DataError) as err:
        load_npz(tmp_path / "d.npz")
    assert message in one_line(err)
    with pytest.raises(DataError, match=message):
        check_labels(y, "labels")
    assert check_labels(np.array([0, 999], np.uint64), "labels").tolist() == [0, 999]


# --- 5. Classifier files: every field is checked -------------------------------------------

@pytest.fixture(scope="module")
def shipped_payload():
    return torch.load(metric.DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)


def write_classifier(path, payload, legacy=False):
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    metric.sidecar_path(path).write_text(f"{metric.file_sha256(path)}  {path.name}\n")
    return path


def edited(payload, changes: dict) -> dict:
    """A copy of `payload` with `changes`: "config.x" (or "state_dict.x", "metadata.x") sets
    one entry of that dictionary, None deletes it; a name without a dot replaces a field."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in payload.items()}
    for key, value in changes.items():
        part, _, entry = key.partition(".")
        target, name = (out[part], entry) if entry else (out, part)
        if value is None:
            del target[name]
        else:
            target[name] = value
    return out


CASES = {
    "config a string": ({"config": "cnn-v1"}, "'config' must be a dictionary, got str"),
    "config key missing": ({"config.widths": None}, "(missing: widths; unknown: none)"),
    "config key unknown": ({"config.bias": True}, "unknown: ['bias']"),
    "architecture a list": ({"config.architecture": ["cnn-v1"]}, "has architecture"),
    "huge width": ({"config.widths": [10**12]}, "widths [1000000000000] (1 to 8 widths"),
    "widths strings": ({"config.widths": ["16", "32"]}, "widths ['16', '32']"),
    "widths a dict": ({"config.widths": {"a": 1}}, "widths {'a': 1}"),
    "num_classes a bool": ({"config.num_classes": True}, "num_classes True (2..1000)"),
    "num_classes huge": ({"config.num_classes": 10**6}, "num_classes 1000000"),
    "image_shape short": ({"config.image_shape": [1, 28]}, "image_shape [1, 28]"),
    "dropout nan": ({"config.dropout": float("nan")}, "dropout nan"),
    "long value truncated": ({"config.num_features": "9" * 10_000}, "num_features 999"),
    "wide but within bounds": ({"config.widths": [4096, 4096], "config.num_features": 16384},
                               "larger than the file"),
    "state_dict a string": ({"state_dict": "weights"}, "'state_dict' must be a dictionary"),
    "weight missing": ({"state_dict.head.bias": None}, "missing ['head.bias']"),
    "weight extra": ({"state_dict.extra": torch.zeros(1)}, "unexpected ['extra']"),
    "weight shape": ({"state_dict.head.bias": torch.zeros(11)},
                     "'head.bias' is torch.float32 (11,), expected torch.float32 (10,)"),
    "weight dtype": ({"state_dict.head.bias": torch.zeros(10, dtype=torch.float64)},
                     "'head.bias' is torch.float64 (10,)"),
    "weight a list": ({"state_dict.head.bias": [0.0] * 10}, "'head.bias' is list"),
    "weight nan": ({"state_dict.head.bias": torch.full((10,), float("nan"))}, "'head.bias' holds NaN"),
    "metadata a string": ({"metadata": "trusted"}, "'metadata' must be a dictionary"),
    "accuracy a string": ({"metadata.test_accuracy": "0.99"}, "test_accuracy in [0, 1]"),
    "format a string": ({"format": "1"}, "not a classifier checkpoint of format 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_classifier_file_is_one_line(tmp_path, shipped_payload, case):
    changes, message = CASES[case]
    path = write_classifier(tmp_path / "clf.pt", edited(shipped_payload, changes))
    err, seconds, peak = bounded(lambda: metric.load_classifier(path))
    assert message in one_line(err) and seconds < 2 and peak < 64 * MiB, (seconds, peak)


def test_classifier_files_of_other_kinds_are_one_line(tmp_path, shipped_payload):
    legacy = write_classifier(tmp_path / "legacy.pt", shipped_payload, legacy=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a pickle")
    metric.sidecar_path(garbage).write_text(f"{metric.file_sha256(garbage)}  garbage.pt\n")
    binary_sidecar = write_classifier(tmp_path / "bin.pt", shipped_payload)
    metric.sidecar_path(binary_sidecar).write_bytes(b"\xff\xfe" * 10_000)
    for path, message in ((legacy, "not a torch zip file"), (garbage, "not a torch zip file"),
                          (binary_sidecar, "does not match its checksum")):
        with pytest.raises(UserError) as err:
            metric.load_classifier(path)
        assert message in one_line(err)
    good = write_classifier(tmp_path / "good.pt", shipped_payload)
    assert metric.load_classifier(good).num_classes == 10  # an exact copy still loads


# --- Through the CLI: exit code 2 and one line -----------------------------------------------

def test_the_cli_refuses_hostile_data_with_one_line(capsys, tmp_path, npz_bomb, shipped_payload):
    start = time.perf_counter()
    line = refused_by_cli(capsys, "train", "--dataset", f"npz:{npz_bomb}", "--out-dir",
                          tmp_path / "runs", "--name", "x", "--epochs", "1", "--no-progress",
                          "--no-tensorboard")
    assert "--max-data-gb" in line and time.perf_counter() - start < 10
    root = tmp_path / "data" / "mnst"
    line = refused_by_cli(capsys, "train", "--dataset", "mnist", "--data-root", root,
                          "--out-dir", tmp_path / "runs", "--name", "y", "--epochs", "1")
    assert "--download" in line and not root.exists()
    crafted = write_classifier(tmp_path / "clf.pt", edited(shipped_payload, {"config.widths": [10**12]}))
    assert "widths" in refused_by_cli(capsys, "classifier", "check", crafted)
