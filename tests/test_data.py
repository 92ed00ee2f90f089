"""Data sources, the reference split and minibatches."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gankit.config import DataConfig
from gankit.data import ShuffledBatches, holdout_split, load_data, load_npz, resolve_dataset_name
from gankit.errors import DataError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("t10k", 40)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_idx_files_read_exactly_and_auto_prefers_mnist(idx_root):
    data = load_data(DataConfig(data_root=str(idx_root)))
    assert data.name == "mnist" and "auto" in data.description
    assert data.train_x.shape == (120, 1, 28, 28) and data.ref_x.shape == (40, 1, 28, 28)
    raw = np.frombuffer(gzip.open(idx_root / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    assert torch.allclose((data.train_x.flatten() + 1) * 127.5, torch.from_numpy(raw.astype(np.float32)),
                          atol=1e-4)
    assert data.train_y.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_auto_falls_back_to_offline_mnist_5k(tmp_path):
    cfg = DataConfig(data_root=str(tmp_path / "empty"))
    assert resolve_dataset_name(cfg) == "mnist-5k"
    data = load_data(cfg)
    assert data.name == "mnist-5k" and data.image_shape == (1, 28, 28)
    # The fixed held-out 10% is stratified: 450 train and 50 reference images per class.
    assert torch.bincount(data.train_y).tolist() == [450] * 10
    assert torch.bincount(data.ref_y).tolist() == [50] * 10
    assert data.train_x.min() >= -1 and data.train_x.max() <= 1
    again = load_data(cfg)
    assert torch.equal(data.ref_x, again.ref_x)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="full MNIST not in ../shared/data/mnist")
def test_full_mnist_from_shared_idx_files():
    data = load_data(DataConfig(dataset="mnist", data_root=str(SHARED_MNIST)))
    assert len(data.train_x) == 60_000 and len(data.ref_x) == 10_000
    assert torch.bincount(data.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                     6265, 5851, 5949]


def test_mnist_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="could not be downloaded.*mnist-5k"):
        load_data(DataConfig(dataset="mnist", data_root=str(tmp_path)))


@pytest.mark.parametrize("shape, layout", [((20, 28, 28), "NHW"), ((20, 32, 32, 3), "NHWC"),
                                           ((20, 3, 32, 32), "NCHW")])
def test_npz_layouts(tmp_path, shape, layout):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    tx, y = load_npz(tmp_path / "d.npz")
    assert y is None and tx.shape[0] == 20 and tx.shape[1] in (1, 3)
    if layout == "NHWC":
        assert torch.allclose((tx[3, :, 5, 7] + 1) * 127.5, torch.tensor(x[3, 5, 7], dtype=torch.float32))
    assert tx.min() >= -1 and tx.max() <= 1


def test_npz_float_ranges(tmp_path):
    np.savez(tmp_path / "unit.npz", x=np.full((4, 8, 8), 0.5, dtype=np.float32))
    assert torch.allclose(load_npz(tmp_path / "unit.npz")[0], torch.zeros(1))
    np.savez(tmp_path / "big.npz", x=np.full((4, 8, 8), 7.0, dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_npz(tmp_path / "big.npz")


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 8, 8))}, "no array named 'x'"),
    ({"x": np.zeros((4, 8))}, "must have shape"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(3, int)}, "'y' must have shape"),
    ({"x": np.zeros((0, 8, 8), np.uint8)}, "holds no images"),
])
def test_npz_bad_arrays(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_image_folder_with_classes_and_errors(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    data = load_data(DataConfig(dataset=f"folder:{tmp_path / 'imgs'}", holdout_fraction=0.2))
    assert data.image_shape == (3, 16, 16) and data.num_classes == 2
    assert len(data.train_x) == 16 and len(data.ref_x) == 4
    resized = load_data(DataConfig(dataset=f"folder:{tmp_path / 'imgs'}", image_size=32))
    assert resized.image_shape == (3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(DataConfig(dataset=f"folder:{tmp_path / 'empty'}"))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "imgs" / "cat" / "odd.png")
    with pytest.raises(DataError, match="different sizes"):
        load_data(DataConfig(dataset=f"folder:{tmp_path / 'imgs'}"))


def test_holdout_split_is_fixed_stratified_and_disjoint():
    x = torch.arange(100).float().view(100, 1, 1, 1)
    y = torch.arange(100) % 4
    a = holdout_split(x, y, 0.2)
    b = holdout_split(x, y, 0.2)
    assert torch.equal(a[2], b[2])
    assert torch.bincount(a[3]).tolist() == [5, 5, 5, 5]
    assert not set(a[0].flatten().tolist()) & set(a[2].flatten().tolist())


def test_batches_are_reproducible_and_resume_mid_epoch():
    x = torch.arange(50).float().view(50, 1, 1, 1)
    batches = ShuffledBatches(x, None, batch_size=8, seed=3)
    assert len(batches) == 6  # the partial batch is dropped
    full = [b.flatten().tolist() for b, _ in batches.epoch(2)]
    tail = [b.flatten().tolist() for b, _ in batches.epoch(2, start=4)]
    assert tail == full[4:]
    assert full != [b.flatten().tolist() for b, _ in batches.epoch(3)]
    assert len({v for batch in full for v in batch}) == 48


def test_the_data_line_counts_the_images_that_train(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 200))
    data = load_data(DataConfig(dataset=f"npz:{tmp_path / 'd.npz'}", limit=64))
    assert len(data.train_x) == 64
    assert f"npz:{tmp_path / 'd.npz'}: 64 (--limit) of 179 training images; reference" in data.description
    assert "--limit" not in load_data(DataConfig(dataset=f"npz:{tmp_path / 'd.npz'}", limit=500)).description
