"""The gankit command: options, configs, errors and exit codes."""

import json
from dataclasses import fields

import numpy as np
import pytest

from gankit import cli
from gankit.config import GROUPS, Config
from gankit.errors import TrainingDiverged

TINY = ["--g-width", "8", "--d-width", "8", "--latent-dim", "8", "--batch-size", "32", "--eval-every", "0",
        "--epochs", "1", "--no-progress", "--no-tensorboard"]


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 200))
    return path


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())  # argparse wraps lines
    for group in GROUPS.values():
        for f in fields(group):
            flag = f"--{f.name.replace('_', '-')}" if f.default is not True else f"--no-{f.name.replace('_', '-')}"
            assert flag in text, flag
    on_by_default = sum(f.default is True for g in GROUPS.values() for f in fields(g))
    assert flat.count("(default:") >= sum(len(fields(g)) for g in GROUPS.values()) - on_by_default
    # A --no-* flag turns its option off, and its help says so (never "(default: True)").
    assert "--no-tensorboard turn off: write TensorBoard logs (on by default)" in flat
    assert flat.count("(on by default)") == on_by_default
    # An option whose help states its default in words shows it once.
    assert "--name NAME run folder name, one folder inside --out-dir (default: <arch>-<loss>-<timestamp>) --" in flat
    assert "(default: True)" not in flat


@pytest.mark.parametrize("argv, message", [
    (["--g-lr", "-1"], "g-lr must be positive"),
    (["--loss", "nope"], "unknown loss 'nope'"),
    (["--d-norm", "weird"], "unknown discriminator normalization"),
    (["--dataset", "npz:/no/such/file.npz"], "npz file not found"),
    (["--dataset", "folder:/no/such/dir"], "image folder not found"),
    (["--dataset", "zzz"], "unknown dataset 'zzz'"),
    (["--loss", "wgan", "--label-smoothing", "0.1"], "apply to bce and lsgan"),
    (["--config", "/no/such/config.json"], "config file not found"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "train", *argv, "--out-dir", tmp_path, *TINY)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("gankit: error:") and message in lines[-1]
    assert "Traceback" not in err


def test_argparse_type_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--g-lr", "fast"])
    assert exit_info.value.code == 2
    assert "invalid float value" in capsys.readouterr().err


def test_conditional_model_without_labels_is_refused(capsys, tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=np.zeros((100, 28, 28), dtype=np.uint8))
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{path}", "--conditional",
                           "--out-dir", tmp_path, *TINY)
    assert code == 2 and "conditional model needs labelled data" in err


def test_all_problems_reported_together(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--g-lr", "-1", "--epochs", "0", "--out-dir", tmp_path)
    assert code == 2 and "g-lr must be positive" in err and "epochs must be in [1, 100000]" in err


def test_config_file_then_command_line_overrides(capsys, tmp_path, npz):
    saved = Config().updated({"eval_every": 0, "g_width": 8, "d_width": 8, "latent_dim": 8, "batch_size": 32,
                              "epochs": 1, "loss": "hinge", "progress": False,
                              "tensorboard": False})
    saved.save(tmp_path / "base.json")
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "base.json", "--d-lr", "0.001",
                           "--dataset", f"npz:{npz}", "--out-dir", tmp_path, "--name", "r")
    assert code == 0, err
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert written["objective"]["loss"] == "hinge" and written["optim"]["d_lr"] == 0.001
    assert written["model"]["g_width"] == 8


def test_resume_refuses_changed_options_and_extends_epochs(capsys, tmp_path, npz):
    base = ["--dataset", f"npz:{npz}", "--out-dir", tmp_path, "--name", "r", *TINY]
    assert run_cli(capsys, "train", *base)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r", "--g-lr", "0.1")
    assert code == 2 and "g_lr" in err
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r")
    assert code == 2 and "finished its 1 epochs" in err
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r", "--epochs", "2")
    assert code == 0, err
    history = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]
    # Starting a new run over an existing one is refused rather than overwriting it.
    assert run_cli(capsys, "train", *base)[0] == 2


def test_resume_finds_moved_data_but_refuses_other_data(capsys, tmp_path, monkeypatch):
    from test_data import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "work" / "mnist"
    data.mkdir(parents=True)
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.chdir(tmp_path / "work")  # a relative --data-root, as users type it
    assert run_cli(capsys, "train", "--data-root", "mnist", "--out-dir", tmp_path, "--name", "r",
                   *TINY)[0] == 0
    moved = tmp_path / "moved"
    data.rename(moved)
    monkeypatch.chdir(tmp_path)
    # From another folder, with `auto` the run would silently fall back to mnist-5k.
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r", "--epochs", "2")
    assert code == 2 and "other data" in err and "--data-root" in err
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r", "--epochs", "2",
                           "--data-root", moved)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["data_root"] == str(moved)
    # The same folder name with other images in it is refused too.
    write_idx(moved / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (64, 28, 28)))
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r", "--epochs", "3",
                           "--data-root", moved)
    assert code == 2 and "other data" in err


def test_generate_png_and_npz(capsys, tmp_path, npz):
    assert run_cli(capsys, "train", "--dataset", f"npz:{npz}", "--conditional", "--out-dir",
                   tmp_path, "--name", "r", *TINY)[0] == 0
    code, _, err = run_cli(capsys, "generate", tmp_path / "r", "--num", "30", "--label", "3",
                           "--out", tmp_path / "s.npz", "--truncation", "0.5")
    assert code == 0, err
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["x"].shape == (30, 1, 28, 28) and arrays["x"].dtype == np.uint8
    assert (arrays["y"] == 3).all()
    code, _, _ = run_cli(capsys, "generate", tmp_path / "r", "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").stat().st_size > 0
    assert run_cli(capsys, "generate", tmp_path / "nothing")[0] == 2
    code, _, err = run_cli(capsys, "generate", tmp_path / "r", "--label", "12")
    assert code == 2 and "not a class of this model (0 to 9)" in err


def test_divergence_exits_3(capsys, monkeypatch, tmp_path, npz):
    def diverge(self):
        raise TrainingDiverged("d_loss became nan at epoch 1, step 3; no checkpoint was written")

    monkeypatch.setattr("gankit.trainer.Trainer.fit", diverge)
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{npz}", "--out-dir", tmp_path, *TINY)
    assert code == 3 and "diverged" in err and "Traceback" not in err


def test_label_on_an_unconditional_model_says_so(capsys, tmp_path, npz):
    assert run_cli(capsys, "train", "--dataset", f"npz:{npz}", "--out-dir", tmp_path, "--name", "u", *TINY)[0] == 0
    code, _, err = run_cli(capsys, "generate", tmp_path / "u", "--label", "3")
    assert code == 2 and "needs a conditional model; this run's generator is unconditional" in err


def test_the_quickstart_preset_trains_a_conditional_g_with_an_ema(capsys, tmp_path, npz):
    assert run_cli(capsys, "train", "--preset", "quickstart", "--dataset", f"npz:{npz}", "--out-dir", tmp_path,
                   "--name", "q", *TINY)[0] == 0
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["model"]["conditional"] is True and saved["optim"]["ema_decay"] == 0.999


@pytest.mark.parametrize("argv, message", [
    (["generate", "{run}", "--nrow", "0"], "--nrow must be in [1, 1000], got 0"),
    (["generate", "{run}", "--sigma", "0", "--truncation", "1"], "--sigma must be positive"),
    (["generate", "{run}", "--truncation", "-1"], "--truncation must be in [0.1, 100] or 0 (off), got -1.0"),
    (["generate", "{run}", "--drs", "--out", "{tmp}/samples.jpg"], "--out must end in .png or .npz"),
    (["generate", "{run}", "--mode", "classes", "--label", "3"], "--mode classes draws every class"),
    (["evaluate", "{run}", "--k", "0"], "--k must be in [1, 1000], got 0"),
    (["evaluate", "{run}", "--sigma", "-0.5"], "--sigma must be positive and at most 100, got -0.5"),
    (["compare", "{run}", "--plot", "{tmp}/curves.txt"], "--plot must end in .png or .pdf or .svg"),
    (["classifier", "train", "--out", "{tmp}/c.pt", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["classifier", "train", "--out", "{tmp}/c.pt", "--lr", "-1"], "--lr positive"),
])
def test_a_mistake_in_generate_evaluate_compare_or_classifier_is_one_line(capsys, tmp_path, npz, argv, message):
    """Each of these once ended in a traceback, some only after the sampling was done."""
    assert run_cli(capsys, "train", "--dataset", f"npz:{npz}", "--out-dir", tmp_path, "--name", "r", *TINY)[0] == 0
    code, _, err = run_cli(capsys, *[a.format(run=tmp_path / "r", tmp=tmp_path) for a in argv])
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("gankit: error:") and message in err
    assert "Traceback" not in err


def test_classifier_device_is_checked_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["classifier", "check", "--device", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "classifier", "check", "--device", "cuda")
        assert code == 2 and "no CUDA GPU is available" in err
