"""Hostile and careless inputs: payload checkpoints, edited run folders, malformed configs and
datasets. Each gets exit code 2 and one error line, runs no code, and changes nothing on disk.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gankit import cli

TINY = ["--g-width", "8", "--d-width", "8", "--latent-dim", "8", "--batch-size", "32",
        "--eval-every", "0", "--no-progress", "--no-tensorboard", "--dataset"]


class Payload:
    """Unpickling this creates `marker`: proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def refused(capsys, *argv, message=""):
    """Run gankit; assert exit 2 and one error line (containing `message`)."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("gankit: error:") and message in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 96))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, npz_data):
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", "--out-dir", str(out), "--name", "run", "--epochs", "1",
                     *TINY, f"npz:{npz_data}"]) == 0
    from gankit import runs
    runs.RunDir(out / "run").unlock()
    return out / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# --- files that would run code -------------------------------------------------------------------

def plant_pickle(path, marker):
    torch.save({"format": 1, "config": {}, "G": Payload(marker)}, path)


@pytest.mark.parametrize("command", ["generate", "evaluate", "resume"])
def test_a_payload_checkpoint_in_a_run_folder_runs_nothing(capsys, run, tmp_path, command):
    marker = tmp_path / "pwned"
    (run / "checkpoints" / "last.safetensors").unlink()
    plant_pickle(run / "checkpoints" / "last.pt", marker)
    before = snapshot(run)
    argv = {"generate": ["generate", run], "evaluate": ["evaluate", run, "--num", "20"],
            "resume": ["train", "--resume", run, "--epochs", "2"]}[command]
    refused(capsys, *argv, message="gankit convert")
    assert not marker.exists() and snapshot(run) == before


def test_a_bare_payload_file_runs_nothing(capsys, tmp_path):
    marker = tmp_path / "pwned"
    for name in ("model.pt", "model.safetensors", "model.bin"):
        plant_pickle(tmp_path / name, marker)
        refused(capsys, "generate", tmp_path / name)
    assert not marker.exists()


def test_conversion_is_explicit(capsys, tmp_path, finished_run):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "model.pt", marker)
    refused(capsys, "convert", tmp_path / "model.pt", message="--trust-pickle")
    assert not marker.exists()


def test_a_forged_state_file_is_refused(capsys, tmp_path):
    from safetensors.torch import save_file

    forged = tmp_path / "forged.safetensors"
    header = {"format": 2, "state": {"config": {"$tensor": "nope"}}}
    save_file({"t0": torch.zeros(1)}, str(forged), metadata={"gankit": json.dumps(header)})
    refused(capsys, "generate", forged, message="missing tensor")
    (tmp_path / "some.json").write_text("{}")
    refused(capsys, "generate", tmp_path / "some.json", message="not a gankit state file")


# --- edited run folders ------------------------------------------------------------------------------

@pytest.mark.parametrize("group,key,value", [("privacy", "target_epsilon", 100.0),
                                             ("train", "seed", 7), ("optim", "d_lr", 0.1)])
def test_resume_refuses_an_edited_config_json(capsys, run, group, key, value):
    config = json.loads((run / "config.json").read_text())
    config[group][key] = value
    (run / "config.json").write_text(json.dumps(config))
    before = snapshot(run)
    refused(capsys, "train", "--resume", run, "--epochs", "2", message=key)
    assert snapshot(run) == before


def test_a_partial_last_history_line_resumes(capsys, run):
    with open(run / "history.jsonl", "a") as f:
        f.write('{"epoch": 2, "st')  # a crash in the middle of a write
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_a_second_process_on_the_same_run_folder_is_refused(capsys, run):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(run / '.lock')!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        refused(capsys, "train", "--resume", run, "--epochs", "2", message="in use")
        refused(capsys, "train", "--out-dir", run.parent, "--name", run.name, "--epochs", "1",
                *TINY, "mnist-5k", message="in use")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_leaves_the_last_checkpoint_whole(capsys, run, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    refused(capsys, "train", "--resume", run, "--epochs", "2", message="No space left")
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before
    assert not list((run / "checkpoints").glob("*.tmp"))


# --- malformed configs and options ------------------------------------------------------------------

@pytest.mark.parametrize("group,key,value,message", [
    ("train", "epochs", "1", "--epochs must be a whole number"),
    ("train", "epochs", 1.5, "--epochs must be a whole number"),
    ("optim", "g_lr", None, "--g-lr must be a number"),
    ("train", "batch_size", [64], "--batch-size must be a whole number"),
    ("model", "conditional", "false", "--conditional must be true or false"),
])
def test_config_values_are_type_checked(capsys, tmp_path, group, key, value, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({group: {key: value}}))
    refused(capsys, "train", "--config", path, "--out-dir", tmp_path, message=message)
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(tmp_path)) == ["bad.json"]


def test_abbreviated_and_malformed_options_are_one_line(capsys, tmp_path):
    for argv in (["--epoch", "3"], ["--epochs", "abc"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--out-dir", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err


def test_delta_at_or_above_one_over_n_is_refused(capsys, tmp_path, npz_data):
    refused(capsys, "train", "--mode", "dp", "--delta", "0.5", "--epochs", "1", "--out-dir",
            tmp_path, *TINY, f"npz:{npz_data}", message="not below 1/N")


# --- malformed datasets ----------------------------------------------------------------------------

def test_a_huge_label_is_refused(capsys, tmp_path):
    y = np.zeros(64, dtype=np.int64)
    y[0] = 10 ** 6
    np.savez(tmp_path / "d.npz", x=np.zeros((64, 28, 28), np.uint8), y=y)
    refused(capsys, "train", "--conditional", "--out-dir", tmp_path, *TINY, f"npz:{tmp_path / 'd.npz'}",
            message="classes")


def test_an_object_npz_is_refused_without_unpickling(capsys, tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "d.npz", x=np.array([Payload(marker)] * 4, dtype=object))
    refused(capsys, "train", "--out-dir", tmp_path, *TINY, f"npz:{tmp_path / 'd.npz'}",
            message="numeric arrays")
    assert not marker.exists()


def test_a_corrupt_image_in_a_folder_is_named(capsys, tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((28, 28), i * 10, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    refused(capsys, "train", "--out-dir", tmp_path, *TINY, f"folder:{tmp_path / 'imgs'}",
            message="broken.png")


def test_image_size_resizes_a_folder_of_mixed_sizes(tmp_path):
    from PIL import Image

    from gankit.config import DataConfig
    from gankit.data import load_data

    for c, size in (("a", 28), ("b", 40)):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((size, size), 100, np.uint8)).save(tmp_path / c / f"{i}.png")
    data = load_data(DataConfig(dataset=f"folder:{tmp_path}", image_size=32))
    assert data.image_shape == (1, 32, 32) and len(data.train_x) + len(data.ref_x) == 20


def test_a_swapped_shipped_classifier_with_a_recomputed_sidecar_is_refused(tmp_path, monkeypatch):
    from gankit.errors import UserError
    from gankit.metrics import classifier as metric

    shipped = metric.DEFAULT_CHECKPOINT
    assert metric.file_sha256(shipped) == metric.SHIPPED_SHA256  # the code knows the real file
    swapped = tmp_path / shipped.name
    swapped.write_bytes(shipped.read_bytes() + b"\0")
    metric.sidecar_path(swapped).write_text(f"{metric.file_sha256(swapped)}  {swapped.name}\n")
    monkeypatch.setattr(metric, "DEFAULT_CHECKPOINT", swapped)
    with pytest.raises(UserError, match="does not match"):
        metric.read_checkpoint()


def test_conversion_reads_an_old_checkpoint_and_still_runs_no_code(capsys, run, tmp_path):
    """`gankit convert --trust-pickle` uses torch's restricted unpickler: an old checkpoint
    (tensors, numpy RNG state, plain values) converts and resumes; a payload is refused."""
    from gankit.statefile import load_state

    state = load_state(run / "checkpoints" / "last.safetensors")
    (run / "checkpoints" / "last.safetensors").unlink()
    torch.save({**state, "format": 1}, run / "checkpoints" / "last.pt")  # an older gankit's file
    assert cli.main(["convert", str(run), "--trust-pickle"]) == 0
    converted = load_state(run / "checkpoints" / "last.safetensors")
    assert converted["rng"]["numpy"][1].dtype == np.uint32
    assert np.array_equal(converted["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert all(torch.equal(converted["G"][k], state["G"][k]) for k in state["G"])
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "model.pt", marker)
    refused(capsys, "convert", tmp_path / "model.pt", "--trust-pickle", message="could not be read")
    assert not marker.exists()
