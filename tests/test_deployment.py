"""Deployment: a SuperLink and two SuperNodes on 127.0.0.1 (separate processes, as on
separate machines) run one round of the project's apps through `flwr run`; every process
the test started is stopped."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config

pytest.importorskip("flwr")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                    reason="Flower's command-line tools are not installed beside this Python")
def test_superlink_and_two_supernodes_complete_a_round(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 300))
    config = tiny_config(tmp_path / "runs", name="deployed", mode="federated", clients=2, rounds=1,
                         local_steps=3, dataset=f"npz:{tmp_path / 'digits.npz'}")
    config.save(tmp_path / "run.json")
    home = tmp_path / "flwr"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    # The SuperLink starts Flower's executors from PATH; no dependency installs at run time.
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    started = []

    def start(*args, log):
        started.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                        stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True))

    try:
        start("flower-superlink", "--insecure", "--port", str(link), "--disable-runtime-dependency-installation",
              log="superlink.log")
        for i in (0, 1):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
                  "--node-config", f"partition-id={i} num-partitions=2", log=f"supernode{i}.log")
        deadline = time.time() + 60
        while time.time() < deadline:
            nodes = subprocess.run([str(BIN / "flwr"), "supernode", "list", "test"], env=env, cwd=tmp_path,
                                   capture_output=True, text=True).stdout
            if nodes.lower().count("online") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail("the two SuperNodes did not come online: " + (tmp_path / "supernode0.log").read_text()[-500:])
        done = subprocess.run([str(BIN / "flwr"), "run", str(ROOT / "server/flower_app"), "test", "--stream",
                               "-c", f"config='{tmp_path / 'run.json'}'"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        history = (tmp_path / "runs/deployed/history.jsonl").read_text().splitlines()
        assert len(history) == 1 and '"clients-replied": 2' in history[0]
        assert (tmp_path / "runs/deployed/checkpoints/last.safetensors").exists()
    finally:
        for proc in reversed(started):  # SuperNodes first, then the SuperLink: graceful SIGTERM
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for proc in started:  # and whatever each started in its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL if proc.poll() is None else signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert all(proc.poll() is not None for proc in started)
