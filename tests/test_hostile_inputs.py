"""Hostile and careless inputs: payload checkpoints, edited run folders, malformed configs and
datasets. Each gets exit code 2 and one error line, runs no code, and changes nothing on disk.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
                *TINY, "mnist-5k", message="holds a run")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_leaves_the_last_checkpoint_whole(capsys, run, monkeypatch):
    import gankit.files

    def full(fd):  # the bytes went to the temporary file; the disk filled before they settled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gankit.files.os, "fsync", full)
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    refused(capsys, "train", "--resume", run, "--epochs", "2", message="No space left")
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before
    assert not list((run / "checkpoints").glob("*.tmp")) and not list((run / "checkpoints").glob(".*"))


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


# --- a run folder cannot be turned against its owner ------------------------------------------------

def plant_link(run, entry, tmp_path):
    """Replace `entry` of the run folder by a link to a victim outside it; returns the victim."""
    victim = tmp_path / "victim"
    target = run / entry
    if target.is_dir():
        victim.mkdir()
        (victim / "keep.txt").write_text("the owner's file\n")
        shutil.rmtree(target)
    else:
        victim.write_text("the owner's file\n")
        target.unlink(missing_ok=True)
    target.symlink_to(victim)
    return victim


def tree(path):
    """Every file under `path` (or the file itself) with its bytes."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", [".lock", "history.jsonl", "train.log", "samples", "checkpoints",
                                   "checkpoints/best.safetensors", "tb"])
@pytest.mark.parametrize("command", ["resume", "generate", "evaluate", "export", "compare"])
def test_a_link_in_a_run_folder_is_refused_and_its_target_untouched(capsys, run, tmp_path, entry, command):
    (run / "tb").mkdir(exist_ok=True)
    victim = plant_link(run, entry, tmp_path)
    before = tree(victim)
    argv = {"resume": ["train", "--resume", run, "--epochs", "2"], "generate": ["generate", run],
            "evaluate": ["evaluate", run, "--num", "20", "--downstream-epochs", "0"],
            "export": ["export", run, "--out", tmp_path / "released"],
            "compare": ["compare", run]}[command]
    refused(capsys, *argv, message="symbolic link")
    assert tree(victim) == before and not (tmp_path / "released").exists()


def test_default_outputs_never_replace_or_follow_anything(capsys, run, tmp_path):
    (run / "generated.png").write_bytes(b"an earlier grid")
    assert cli.main(["generate", str(run), "--num", "4"]) == 0
    assert (run / "generated.png").read_bytes() == b"an earlier grid"
    assert (run / "generated-2.png").read_bytes().startswith(b"\x89PNG")
    for _ in range(2):
        assert cli.main(["evaluate", str(run), "--num", "20", "--downstream-epochs", "0"]) == 0
    first, second = (json.loads((run / "eval" / f / "metrics.json").read_text()) for f in ("last", "last-2"))
    assert first["metrics"] == second["metrics"]  # the same seed: the second is kept beside the first


@pytest.mark.parametrize("command", ["generate", "export", "compare", "compare-plot", "evaluate"])
def test_a_named_output_is_replaced_only_with_force(capsys, run, tmp_path, command):
    out = {"generate": tmp_path / "grid.png", "export": tmp_path / "released",
           "compare": tmp_path / "table.md", "compare-plot": tmp_path / "plot.png",
           "evaluate": tmp_path / "eval"}[command]
    existing = out / ("generator.safetensors" if command == "export" else "metrics.json") \
        if command in ("export", "evaluate") else out
    existing.parent.mkdir(exist_ok=True)
    existing.write_bytes(b"earlier work")
    argv = {"generate": ["generate", run, "--out", out], "export": ["export", run, "--out", out],
            "compare": ["compare", run, "--out", out], "compare-plot": ["compare", run, "--plot", out],
            "evaluate": ["evaluate", run, "--num", "20", "--downstream-epochs", "0", "--out", out]}[command]
    refused(capsys, *argv, message="--force")
    assert existing.read_bytes() == b"earlier work"
    assert cli.main([str(a) for a in argv] + ["--force"]) == 0
    assert existing.read_bytes() != b"earlier work"


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute-run", "a/b", "..", "."])
def test_a_run_name_is_one_folder_name(capsys, tmp_path, npz_data, name):
    out = tmp_path / "runs"
    refused(capsys, "train", "--out-dir", out, "--name", name, "--epochs", "1", *TINY, f"npz:{npz_data}",
            message="--name must be one folder name")
    assert not out.exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/absolute-run").exists()


def test_a_new_run_never_takes_over_an_existing_folder(capsys, run, tmp_path, npz_data):
    before = snapshot(run)
    refused(capsys, "train", "--out-dir", run.parent, "--name", run.name, "--epochs", "1", "--seed", "5",
            *TINY, f"npz:{npz_data}", message="holds a run")
    assert snapshot(run) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    refused(capsys, "train", "--out-dir", tmp_path, "--name", "notes", "--epochs", "1",
            *TINY, f"npz:{npz_data}", message="is not empty")
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]


def test_a_refused_run_leaves_nothing_behind(capsys, tmp_path, npz_data):
    out = tmp_path / "new" / "runs"
    # Refused by the trainer, after the run folder was made: 96 images cannot fill a batch of 1000.
    refused(capsys, "train", "--out-dir", out, "--name", "r", "--epochs", "1", *TINY, f"npz:{npz_data}",
            "--batch-size", "1000", message="batch size")
    assert not (tmp_path / "new").exists()


def test_conversion_never_goes_back_in_time(capsys, run, tmp_path):
    from gankit.statefile import load_state

    ckpt = run / "checkpoints" / "last.safetensors"
    state = load_state(ckpt)
    state.pop("format", None)
    torch.save(state, run / "checkpoints" / "last.pt")
    os.utime(run / "checkpoints" / "last.pt", (1, 1))  # the pickle is older than the state file
    before = ckpt.read_bytes()
    assert cli.main(["convert", str(run), "--trust-pickle", "--force"]) == 0
    assert ckpt.read_bytes() == before


# --- numbers that cannot be NaN ------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--delta", "nan"), ("--target-epsilon", "nan"), ("--target-epsilon", "inf"), ("--g-lr", "inf"),
    ("--latent-sigma", "inf"), ("--clip-value", "nan"), ("--gp-weight", "nan"),
    ("--client-dp-noise", "nan"), ("--client-dp-noise", "inf"), ("--client-dp-clip", "nan"),
    ("--server-lr", "nan"), ("--d-lr", "-inf"), ("--ema-decay", "nan"),
])
def test_a_non_finite_option_is_refused_before_anything_runs(capsys, tmp_path, npz_data, option, value):
    refused(capsys, "train", "--out-dir", tmp_path / "runs", "--epochs", "1", f"{option}={value}",
            *TINY, f"npz:{npz_data}", message=f"{option} must be a finite number")
    assert not (tmp_path / "runs").exists()


def test_a_non_finite_value_in_a_config_file_is_refused(capsys, tmp_path):
    (tmp_path / "c.json").write_text('{"privacy": {"delta": NaN}, "optim": {"g_lr": Infinity}}')
    line = refused(capsys, "train", "--config", tmp_path / "c.json", "--out-dir", tmp_path / "runs")
    assert "--delta must be a finite number" in line and "--g-lr must be a finite number" in line


def test_every_numeric_option_has_a_range_and_the_defaults_lie_in_it():
    from dataclasses import fields

    from gankit.config import GROUPS, RANGES, Config, range_problems

    numeric = {f.name for g in GROUPS.values() for f in fields(g) if f.type in (int, float)}
    assert numeric == set(RANGES)
    assert range_problems(Config()) == []


@pytest.mark.parametrize("option,value,message", [
    ("--epochs", "1000000000000", "--epochs must be in [1, 100000]"),
    ("--g-width", "100000", "--g-width must be in [1, 2048]"),
    ("--latent-dim", "1000000000", "--latent-dim must be in [1, 4096]"),
    ("--image-size", "100000", "--image-size must be in [4, 1024]"),
    ("--eval-samples", "1000000000", "--eval-samples must be in [1, 1e+06]"),
    ("--target-epsilon", "1e-300", "--target-epsilon must be in [0.01, 100] or 0 (off)"),
])
def test_sizes_that_cannot_run_are_refused_up_front(capsys, tmp_path, npz_data, option, value, message):
    refused(capsys, "train", "--out-dir", tmp_path / "runs", "--mode", "dp", *TINY, f"npz:{npz_data}",
            option, value, message=message)


def test_generate_refuses_a_generator_with_non_finite_weights(capsys, run, tmp_path):
    from gankit.statefile import load_state, save_state

    ckpt = run / "checkpoints" / "last.safetensors"
    state = load_state(ckpt)
    first = next(k for k, v in state["G"].items() if v.is_floating_point())
    state["G"][first][0] = float("nan")
    save_state(state, ckpt)
    refused(capsys, "generate", run, "--out", tmp_path / "g.png", message="non-finite weights")
    assert not (tmp_path / "g.png").exists()
    refused(capsys, "generate", run, "--num", "1000000000", message="--num must be in [1, 1e+06]")


# --- hostile or broken files are one line -----------------------------------------------------------

def deep_json(levels):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("content,message", [
    (deep_json(100_000), "nests deeper"), (b"\xff\xfe{}", "not UTF-8"),
    ('{"train": {"seed": ' + "9" * 5000 + "}}", "cannot read"),
    ('{"train": {"name": "' + "x" * 100_000 + '"}}', "characters)"),
])
def test_a_hostile_config_file_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = refused(capsys, "train", "--config", path, "--out-dir", tmp_path / "runs", message=message)
    assert len(line) < 1000


@pytest.mark.parametrize("content", [deep_json(100_000), b"\xff\xfe\n", '{"epoch": ' + "9" * 5000 + "}"])
def test_a_hostile_history_is_one_line(capsys, run, content):
    broken = content if isinstance(content, bytes) else content.encode()
    (run / "history.jsonl").write_bytes(broken + b"\n" + (run / "history.jsonl").read_bytes())
    refused(capsys, "compare", run)
    refused(capsys, "train", "--resume", run, "--epochs", "2")


def forge_checkpoint(run, change):
    from gankit.statefile import load_state, save_state

    ckpt = run / "checkpoints" / "last.safetensors"
    state = load_state(ckpt)
    change(state)
    save_state(state, ckpt)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("G"), "generator weights do not fit"),
    (lambda s: s.update(G="a string"), "generator weights do not fit"),
    (lambda s: s["G"].update({k: torch.zeros(3) for k in list(s["G"])[:1]}), "generator weights do not fit"),
    (lambda s: s.update(config="a string"), "no config"),
    (lambda s: s["config"]["latent"].update(latent_dim=10**9), "--latent-dim must be in"),
    (lambda s: s["config"]["model"].update(g_width=10**9), "--g-width must be in"),
    (lambda s: s["data"].update(image_shape=[1, 100000, 100000]), "image_shape must be"),
    (lambda s: s["data"].update(num_classes="ten"), "num_classes must be"),
])
@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
def test_a_broken_checkpoint_is_one_line(capsys, run, tmp_path, change, message, command):
    forge_checkpoint(run, change)
    argv = {"generate": ["generate", run, "--out", tmp_path / "g.png"],
            "evaluate": ["evaluate", run, "--num", "20", "--downstream-epochs", "0"],
            "export": ["export", run, "--out", tmp_path / "released"]}[command]
    refused(capsys, *argv, message=message)


def test_deep_nesting_in_a_checkpoint_header_is_one_line(capsys, tmp_path):
    from safetensors.torch import save_file

    forged = tmp_path / "deep.safetensors"
    save_file({"t0": torch.zeros(1)}, str(forged), metadata={"gankit": deep_json(100_000)})
    refused(capsys, "generate", forged, message="nests deeper")
    nested = {"format": 2, "state": {"config": json.loads(deep_json(900))}}
    save_file({"t0": torch.zeros(1)}, str(forged), metadata={"gankit": json.dumps(nested)})
    refused(capsys, "generate", forged)


def test_an_error_never_echoes_a_huge_value(capsys, tmp_path):
    line = refused(capsys, "train", "--out-dir", tmp_path, "--name", "n/" + "x" * 10**6)
    assert len(line) < 500


def test_networks_too_large_for_the_machine_are_refused_before_they_are_built(capsys, tmp_path, npz_data):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = refused(capsys, "train", "--out-dir", tmp_path / "runs", *TINY, f"npz:{npz_data}",
                   "--g-width", "2048", "--d-width", "2048", "--image-size", "256",
                   message="--max-model-gb 8")
    assert "1.47e+03 GB" in line  # 4 copies (weights, gradients, Adam's moments) of 91.7e9 weights
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: nothing built
    assert not (tmp_path / "runs").exists()
