"""Deployment: a SuperLink and SuperNodes on 127.0.0.1 (separate processes, as on separate
machines) with TLS and SuperNode authentication, as the README's secure recipe runs them:
certificates and keys from server/flower_app/make_certs.py, node public keys registered with
`flwr supernode register`, one round of the project's apps through `flwr run`. SuperNodes
nobody registered are refused and take no part in the round. Every process the test started
is stopped.

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


@pytest.mark.skipif(bool(missing_tools()),
                    reason=f"Flower's command-line tools are not installed beside this Python: {missing_tools()}")
def test_tls_superlink_admits_only_registered_supernodes(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 300))
    config = tiny_config(tmp_path / "runs", name="deployed", mode="federated", clients=2, rounds=1,
                         local_steps=3, dataset=f"npz:{tmp_path / 'digits.npz'}")
    config.save(tmp_path / "run.json")

    certs = tmp_path / "certs"
    made = subprocess.run([sys.executable, str(MAKE_CERTS), str(certs), "--node", "node0", "--node", "node1",
                           "--node", "stranger"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (certs / ".gitignore").read_text() == "*\n"
    assert all((certs / f).stat().st_mode & 0o077 == 0 for f in ("ca.key", "server.key", "node0.key"))

    home = tmp_path / "flwr"
    home.mkdir()
    link = free_port()
    # The flwr CLI's connection: TLS, trusting only the federation's own CA.
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    # The SuperLink starts Flower's executors from PATH, and they import this checkout's
    # server.app / clients.app; no dependency installs at run time.
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    started = {}

    def start(name, *args):
        started[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                         stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(name):
        return (tmp_path / f"{name}.log").read_text()

    def flwr(*args, timeout=60):
        return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)

    def supernode(name, *auth, partition):
        start(name, "flower-supernode", "--superlink", f"127.0.0.1:{link}", "--root-certificates",
              str(certs / "ca.crt"), *auth, "--port", str(free_port()),
              "--node-config", f"partition-id={partition} num-partitions=2")

    def flwr_json(*args):
        # With --format json the CLI reports a failure as {"success": false, ...}, exit code 0.
        out = flwr(*args, "--format", "json").stdout
        return json.loads(out[out.index("{"):]) if "{" in out else {"success": False, "stdout": out}

    def nodes():
        listed = flwr_json("supernode", "list", "test")
        assert listed.get("success"), listed
        return {n["node-id"]: n["status"] for n in listed["nodes"]}

    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
              "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
              "--enable-supernode-auth", "--database", str(home / "superlink.db"), "--port", str(link),
              "--disable-runtime-dependency-installation")
        # The operator registers the two announced SuperNodes' public keys (retried until the
        # SuperLink listens); the first success also shows the CLI trusts the TLS certificate.
        registered = []
        for name in ("node0", "node1"):
            deadline = time.time() + 60
            while True:
                reg = flwr_json("supernode", "register", str(certs / f"{name}.pub"), "test")
                if reg.get("success"):
                    registered.append(str(reg["node-id"]))
                    break
                if time.time() > deadline or started["superlink"].poll() is not None:
                    pytest.fail(f"registering {name} failed: {reg} superlink: {log('superlink')[-1000:]}")
                time.sleep(0.5)

        supernode("node0", "--auth-supernode-private-key", str(certs / "node0.key"), partition=0)
        supernode("node1", "--auth-supernode-private-key", str(certs / "node1.key"), partition=1)
        # Two unannounced SuperNodes, configured so that either would train if admitted: one
        # with a key pair nobody registered, one with none (it would register itself).
        supernode("stranger", "--auth-supernode-private-key", str(certs / "stranger.key"), partition=1)
        supernode("keyless", partition=1)

        deadline = time.time() + 60
        while time.time() < deadline:
            refused = all(started[n].poll() is not None for n in ("stranger", "keyless"))
            if refused and sorted(k for k, v in nodes().items() if v == "online") == sorted(registered):
                break
            time.sleep(1)
        else:
            pytest.fail(f"expected nodes {registered} online and the strangers refused; nodes: {nodes()}; "
                        f"node0: {log('node0')[-500:]}; stranger: {log('stranger')[-500:]}")
        # Refused at the door, each with Flower's reason, and never listed as a node.
        assert "Failed to activate SuperNode" in log("stranger")
        assert "must be registered via the CLI" in log("keyless")
        assert sorted(nodes()) == sorted(registered)

        done = flwr("run", str(ROOT / "server/flower_app"), "test", "--stream",
                    "-c", f"config='{tmp_path / 'run.json'}'", timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        history = (tmp_path / "runs/deployed/history.jsonl").read_text().splitlines()
        # FedAvg samples every connected node (fraction 1.0): two replies, the registered nodes'.
        assert len(history) == 1 and json.loads(history[0])["clients-replied"] == 2
        assert (tmp_path / "runs/deployed/checkpoints/last.safetensors").exists()
    finally:
        procs = list(started.values())
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
    assert all(proc.poll() is not None for proc in started.values())
