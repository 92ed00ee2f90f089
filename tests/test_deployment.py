"""Deployment: a SuperLink and SuperNodes on 127.0.0.1 (separate processes, as on separate
machines) with TLS and SuperNode authentication, as the README's secure recipe runs them:
certificates and keys from server/flower_app/make_certs.py, node public keys registered with
`flwr supernode register`, one round of the project's apps through `flwr run`. SuperNodes
nobody registered are refused and take no part in the round. Every process the test started
is stopped. (`Deployment` is also the federation that tests/test_hostile_deployment.py attacks.)

(The README's insecure recipe is only a local demo and differs from this one only by its
`--insecure` flags, so it has no test of its own: one deployment round costs ~40 s here.)"""

import json
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
pytest.importorskip("cryptography", reason="make_certs.py needs the cryptography package")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = ROOT / "server/flower_app/make_certs.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list:
    return [t for t in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
            if shutil.which(t, path=str(BIN)) is None]


needs_flower_tools = pytest.mark.skipif(
    bool(missing_tools()), reason=f"Flower's command-line tools are not installed beside this Python: {missing_tools()}")


class Deployment:
    """The README's secure recipe in `folder`: a CA, the SuperLink's certificate and one key
    pair per name in `nodes` (make_certs.py), a flwr CLI connection "test" that trusts only
    that CA, and the processes started through it (each in a process group of its own, with
    its output in NAME.log); `stop()` ends them all."""

    def __init__(self, folder: Path, nodes: list[str]):
        self.folder, self.certs, self.home = folder, folder / "certs", folder / "flwr"
        made = subprocess.run([sys.executable, str(MAKE_CERTS), str(self.certs)] +
                              [arg for name in nodes for arg in ("--node", name)],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        self.home.mkdir()
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        # The SuperLink starts Flower's executors from PATH, and they import this checkout's
        # server.app / clients.app; no dependency installs at run time. Unbuffered, so that
        # the logs can be watched while the processes run.
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *argv) -> subprocess.Popen:
        self.started[name] = subprocess.Popen(list(argv), env=self.env, cwd=self.folder,
                                              stdout=open(self.folder / f"{name}.log", "w"),
                                              stderr=subprocess.STDOUT, start_new_session=True)
        return self.started[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def flwr(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout)

    def flwr_json(self, *args) -> dict:
        # With --format json the CLI reports a failure as {"success": false, ...}, exit code 0.
        out = self.flwr(*args, "--format", "json").stdout
        return json.loads(out[out.index("{"):]) if "{" in out else {"success": False, "stdout": out}

    def nodes(self) -> dict[int, str]:
        listed = self.flwr_json("supernode", "list", "test")
        assert listed.get("success"), listed
        return {int(n["node-id"]): n["status"] for n in listed["nodes"]}

    def start_superlink(self) -> None:
        self.start("superlink", str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                   "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
                   "--enable-supernode-auth", "--database", str(self.home / "superlink.db"), "--port", str(self.port),
                   "--disable-runtime-dependency-installation")

    def register(self, name: str) -> int:
        """The operator registers NAME.pub (retried until the SuperLink listens); its node id."""
        deadline = time.time() + 60
        while True:
            reg = self.flwr_json("supernode", "register", str(self.certs / f"{name}.pub"), "test")
            if reg.get("success"):
                return int(reg["node-id"])
            if time.time() > deadline or self.started["superlink"].poll() is not None:
                pytest.fail(f"registering {name} failed: {reg} superlink: {self.log('superlink')[-1000:]}")
            time.sleep(0.5)

    def supernode(self, name: str, *auth, partition: int, partitions: int) -> subprocess.Popen:
        return self.start(name, str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                          "--root-certificates", str(self.certs / "ca.crt"), *auth, "--port", str(free_port()),
                          "--node-config", f"partition-id={partition} num-partitions={partitions}")

    def wait_online(self, expected: list[int], refused: tuple[str, ...] = (), timeout=60) -> None:
        """Until exactly the `expected` node ids are online and the `refused` processes ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            gone = all(self.started[n].poll() is not None for n in refused)
            if gone and sorted(k for k, v in self.nodes().items() if v == "online") == sorted(expected):
                return
            time.sleep(1)
        pytest.fail(f"expected nodes {expected} online and {refused} refused; nodes: {self.nodes()}; "
                    + "; ".join(f"{n}: {self.log(n)[-300:]}" for n in self.started))

    def stop(self) -> None:
        procs = list(self.started.values())
        for proc in reversed(procs):  # SuperNodes first, then the SuperLink: graceful SIGTERM
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for proc in procs:  # and whatever each started in its process group (executors, apps)
            try:
                os.killpg(proc.pid, signal.SIGKILL if proc.poll() is None else signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        assert all(proc.poll() is not None for proc in procs)


@needs_flower_tools
def test_tls_superlink_admits_only_registered_supernodes(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 300))
    config = tiny_config(tmp_path / "runs", name="deployed", mode="federated", clients=2, rounds=1,
                         local_steps=3, dataset=f"npz:{tmp_path / 'digits.npz'}")
    config.save(tmp_path / "run.json")

    fed = Deployment(tmp_path, ["node0", "node1", "stranger"])
    certs = fed.certs
    assert (certs / ".gitignore").read_text() == "*\n"
    assert all((certs / f).stat().st_mode & 0o077 == 0 for f in ("ca.key", "server.key", "node0.key"))
    try:
        fed.start_superlink()
        # The operator registers the two announced SuperNodes' public keys; the first success
        # also shows the CLI trusts the TLS certificate.
        registered = [fed.register("node0"), fed.register("node1")]
        fed.supernode("node0", "--auth-supernode-private-key", str(certs / "node0.key"), partition=0, partitions=2)
        fed.supernode("node1", "--auth-supernode-private-key", str(certs / "node1.key"), partition=1, partitions=2)
        # Two unannounced SuperNodes, configured so that either would train if admitted: one
        # with a key pair nobody registered, one with none (it would register itself).
        fed.supernode("stranger", "--auth-supernode-private-key", str(certs / "stranger.key"), partition=1,
                      partitions=2)
        fed.supernode("keyless", partition=1, partitions=2)
        fed.wait_online(registered, refused=("stranger", "keyless"))
        # Refused at the door, each with Flower's reason, and never listed as a node.
        assert "Failed to activate SuperNode" in fed.log("stranger")
        assert "must be registered via the CLI" in fed.log("keyless")
        assert sorted(fed.nodes()) == sorted(registered)

        done = fed.flwr("run", str(ROOT / "server/flower_app"), "test", "--stream",
                        "-c", f"config='{tmp_path / 'run.json'}'", timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        history = (tmp_path / "runs/deployed/history.jsonl").read_text().splitlines()
        # FedAvg samples every connected node (fraction 1.0): two replies, the registered nodes'.
        assert len(history) == 1 and json.loads(history[0])["clients-replied"] == 2
        assert (tmp_path / "runs/deployed/checkpoints/last.safetensors").exists()
        # The deployed server keeps its log in the run folder, as a CLI run does.
        assert "round 1/1" in (tmp_path / "runs/deployed/train.log").read_text()
    finally:
        fed.stop()
