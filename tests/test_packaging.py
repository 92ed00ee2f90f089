"""A wheel built from the repository runs the main job in a fresh environment."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what the wheel is made of: building in the checkout would write
    # build/ there and could pack a stale build/lib left by an earlier build.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("toolkit", "server", "clients", "checkpoints", "experiments/configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=600)
    return next(out.glob("gankit-*.whl"))


def test_the_wheel_installs_one_package_with_the_shipped_classifier(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"gankit"}  # no generic top-level toolkit, server or clients
    assert {"gankit/checkpoints/mnist_classifier.pt", "gankit/checkpoints/mnist_classifier.sha256",
            "gankit/server/app.py", "gankit/clients/app.py", "gankit/cli.py",
            "gankit/study_configs/dp_sweep_small.json", "gankit/dp_sweep.py"} <= set(names)


def test_the_installed_wheel_runs_the_main_job_outside_the_checkout(wheel, tmp_path):
    # A fresh venv with the wheel alone; its dependencies come from this environment's
    # site-packages (a path, not a site dir, so the checkout's editable install stays out).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the dependencies' path also shows this checkout's editable gankit,
    # which pip would otherwise take as already installed.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    rng = np.random.default_rng(0)
    np.savez(work / "digits.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 200))
    # A clean environment: nothing the test process picked up (Ray's and Flower's variables,
    # PYTHONPATH) may decide what the fresh install imports.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
           "LANG": "C.UTF-8"}
    probe = subprocess.run([str(python), "-c", "import gankit, importlib.util as u; print(gankit.__file__); "
                            "print(u.find_spec('toolkit'), u.find_spec('server'), u.find_spec('clients'))"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    installed, missing = probe.stdout.splitlines()
    assert installed.startswith(site) and missing == "None None None"
    # The main job, evaluated with the shipped classifier (1x28x28, 10 classes).
    done = subprocess.run([str(venv / "bin" / "gankit"), "train", "--dataset", "npz:digits.npz", "--epochs", "1",
                           "--g-width", "8", "--d-width", "8", "--batch-size", "50", "--eval-samples", "100",
                           "--no-progress", "--no-tensorboard", "--name", "quick"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    history = (work / "runs" / "quick" / "history.jsonl").read_text()
    assert '"fid"' in history  # evaluated: the packaged classifier was found and loaded
    # What a user does next, from the installed package alone.
    for argv, made in [(["generate", "runs/quick", "--num", "16", "--out", "g.png"], "g.png"),
                       (["evaluate", "runs/quick", "--num", "50", "--downstream-epochs", "0"],
                        "runs/quick/eval/last/metrics.json"),
                       (["compare", "runs/quick", "--out", "table.md"], "table.md"),
                       (["audit", "runs/quick", "--n", "20"], "runs/quick/audit/membership.json"),
                       (["export", "runs/quick", "--out", "released"], "released/generator.safetensors"),
                       (["generate", "released", "--num", "4", "--out", "r.png"], "r.png")]:
        step = subprocess.run([str(venv / "bin" / "gankit"), *argv], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert step.returncode == 0 and (work / made).is_file(), (argv, step.stderr[-2000:])

    # A tiny privacy-budget sweep from the installed package: trained, evaluated, audited, tabled.
    import json

    (work / "sweep.json").write_text(json.dumps({
        "base": {"dataset": "npz:digits.npz", "g_width": 8, "d_width": 8, "latent_dim": 8,
                 "batch_size": 50, "epochs": 1, "eval_every": 0, "tensorboard": False, "progress": False},
        "evaluation": {"samples": 100, "downstream_epochs": 0, "audit_samples": 20},
        "rows": {"eps8": {"mode": "dp", "target_epsilon": 8}, "non-private": {"mode": "standard"}}}))
    study = subprocess.run([str(venv / "bin" / "gankit"), "study", "dp-sweep", "--config", "sweep.json",
                            "--out", "sweep", "--sequential"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
    assert study.returncode == 0, study.stderr[-2000:]
    table = (work / "sweep" / "table.md").read_text()
    assert "| eps8 |" in table and "| non-private |" in table
    assert "Command: `gankit study dp-sweep --config sweep.json" in table
    # Every kind's default config ships with the package, inside the installed gankit.
    shipped = subprocess.run([str(python), "-c", "from gankit.studies import study_config; "
                              "p = study_config('objective_study_small.json'); print(p.is_file(), p)"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert shipped.stdout.split() == ["True", str(Path(site) / "gankit" / "study_configs" / "objective_study_small.json")]
