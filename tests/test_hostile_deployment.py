"""The deployment under attack: the README's secure recipe (TLS SuperLink, SuperNode
authentication; tests/test_deployment.py's `Deployment`) on 127.0.0.1, with registered
SuperNodes that misbehave. One federation of eight SuperNodes and seven partitions runs two
rounds (sample-level and client-level DP on), in about two and a half minutes:

- two honest SuperNodes (partitions 0 and 1), the project's ClientApp;
- a "thief": the project's SuperNode and ClientApp, configured with partition 0, which an
  honest node already holds;
- a victim (partition 2), killed with SIGKILL during its local training in round 1;
- four hostile SuperNodes (partitions 3 to 6): this file run as a script, speaking Flower's
  Fleet API with their registered keys (Flower's own connection code) and answering each
  message themselves:
  wrong-schema  replies with arrays the model does not have, and without some it has;
  huge          replies with every weight 1e30 (finite);
  duplicate     pushes its reply, the same reply again, then a second, different reply;
  late          in round 2 first pushes another reply to its round-1 message, then its reply.
  The well-formed replies (duplicate's first, late's) echo the global model they were sent
  with the metrics an honest client reports: the guard would accept them.

What happens (asserted below): the SuperLink stores one reply per message and refuses a reply
to a message that is over (its log says why); the guard drops the wrong schema and the huge
update with a count and a log line naming the node; the victim's message comes back as an
error once the SuperLink declares it offline (its heartbeat is 30 s, so within 60 s) and is
counted as failed; the thief is asked its partition, refused rounds and never charged. Both
rounds aggregate with the others, and the privacy record (client-level epsilon and the
sample-level account per partition) is exactly what the server's own accounting gives for the
partitions it sent each round, as in an all-honest run with the same nodes."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography", reason="make_certs.py needs the cryptography package")

ATTACKS = ("wrong-schema", "huge", "duplicate", "late")


# --- a hostile SuperNode: this file run as a script -------------------------------------------

def shifted(message, by: float):
    """The global model the message carried, every weight moved by `by`."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v.numpy() + np.asarray(by, v.numpy().dtype) if v.numpy().dtype.kind == "f"
                                 else v.numpy()) for k, v in message.content["arrays"].items()})


def echo_reply(message, arrays=None):
    """A well-formed train reply: a plausible update of the arrays it was sent (or `arrays`)
    and the metrics an honest client reports, with whatever the server asked of its node
    echoed. The guard would accept it."""
    from flwr.app import Message, MetricRecord, RecordDict

    cfg = message.content["config"]
    run = json.loads(str(cfg["config-json"]))
    metrics = {"num-examples": 1, "client": int(cfg["client"]), "local-steps": run["federated"]["local_steps"],
               "d_loss": 1.0}
    for key in ("num-examples", "noise-multiplier", "sample-rate", "dp-steps", "delta"):
        if key in cfg:  # sample-level DP: the server's plan for this node
            metrics[key] = cfg[key]
    if "noise-multiplier" in cfg:
        metrics["epsilon"] = 1.0
        metrics.pop("d_loss")  # the dp mode reports no loss that reads the real batch
    arrays = shifted(message, 1e-3) if arrays is None else arrays
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)


def hostile_reply(attack: str, message):
    from flwr.app import Array, ArrayRecord

    arrays = {k: v.numpy() for k, v in message.content["arrays"].items()}
    if attack == "wrong-schema":
        dropped = sorted(arrays)[0]
        forged = {k: v for k, v in arrays.items() if k != dropped}
        forged["d.backdoor.weight"] = np.zeros(3, np.float32)
        return echo_reply(message, ArrayRecord({k: Array(v) for k, v in forged.items()}))
    if attack == "huge":
        huge = {k: np.full_like(v, 1e30) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        return echo_reply(message, ArrayRecord({k: Array(v) for k, v in huge.items()}))
    return echo_reply(message)


def hostile_supernode(attack: str, superlink: str, ca: str, key: str, partition: int, partitions: int,
                      trace: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects, get_object_tree,
                                                             iterate_object_tree, no_object_id_recompute)
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
    from flwr.supernode.fleet_http_connection import http_request_response

    private = load_ssh_private_key(Path(key).read_bytes(), None)
    with http_request_response(superlink, False, ca, (private, private.public_key())) as conn, \
            open(trace, "a") as out:
        node, receive, send, _, _, pull_object, push_object, confirm = conn

        def note(**facts):
            out.write(json.dumps({"node": node, **facts}) + "\n")
            out.flush()

        def send_reply(reply: Message, what: str):
            """Push the reply as a SuperNode does; returns the upload of its objects (arrays,
            records), which the SuperLink asks for, in the session it opened, after it has
            stored the reply."""
            with no_object_id_recompute():
                reply.metadata.__dict__["_message_id"] = reply.object_id
                objects, tree = get_all_nested_objects(reply), get_object_tree(reply)
                wanted, session = send(reply, tree, 0.0)
            note(pushed=what, message_id=reply.metadata.message_id,
                 reply_to=reply.metadata.reply_to_message_id, objects_wanted=len(wanted))

            def upload():
                try:
                    for sub in iterate_object_tree(tree):
                        if sub.object_id in wanted:
                            push_object(reply.metadata.run_id, session, sub.object_id,
                                        objects[sub.object_id].deflate())
                except Exception as err:  # a refused upload is noted; the node goes on
                    note(upload_failed=what, error=str(err)[:200])
            return upload

        def push(reply: Message, what: str) -> None:
            send_reply(reply, what)()

        previous = None  # this node's last train message
        while True:
            received = receive()
            if received is None:
                time.sleep(0.5)
                continue
            stub, tree = received
            run, message_id = stub.metadata.run_id, stub.metadata.message_id
            contents = pull_objects([t.object_id for t in iterate_object_tree(tree)],
                                    lambda object_id: pull_object(run, object_id))
            confirm(run, message_id)
            message = inflate_object_from_contents(message_id, contents)
            message.metadata.__dict__["_message_id"] = message_id
            note(received=message.metadata.message_type, message_id=message_id)
            if message.metadata.message_type == MessageType.QUERY:
                facts = {"partition-id": partition, "num-partitions": partitions}
                push(Message(RecordDict({"node": MetricRecord(facts)}), reply_to=message), "partition")
                continue
            if attack == "late" and previous is not None:
                push(echo_reply(previous), "late")
            if attack == "duplicate":
                # The same reply again and a second one while the SuperLink holds the first
                # without its objects (a new push of a reply opens a new session for them).
                first = echo_reply(message)
                send_reply(first, "reply")
                upload = send_reply(first, "the same reply again")
                push(echo_reply(message, shifted(message, 1.0)), "a second reply")
                upload()
            else:
                push(hostile_reply(attack, message), "reply")
            previous = message


if __name__ == "__main__":
    attack_, superlink_, ca_, key_, partition_, partitions_, trace_ = sys.argv[1:8]
    hostile_supernode(attack_, superlink_, ca_, key_, int(partition_), int(partitions_), trace_)


# --- the test -----------------------------------------------------------------------------------

def clientapp_running(group: int) -> bool:
    """Whether a process of this process group runs a ClientApp (Flower starts one per message)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == group and b"clientapp" in (entry / "cmdline").read_bytes():
                return True
        except (OSError, ProcessLookupError):
            continue
    return False


def test_a_deployment_contains_hostile_and_failing_supernodes(tmp_path):
    from conftest import tiny_config
    from test_deployment import ROOT, Deployment, missing_tools

    from gankit.data import load_data
    from gankit.federated import GlobalModel, sample_dp_plan
    from gankit.runs import RunDir
    from gankit.server.app import privacy_record
    from gankit.statefile import load_state

    if missing_tools():
        pytest.skip(f"Flower's command-line tools are not installed beside this Python: {missing_tools()}")
    if not Path("/proc").is_dir():
        pytest.skip("finding the victim's ClientApp reads /proc (Linux)")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 600))
    partitions = 7
    config = tiny_config(tmp_path / "runs", name="attacked", mode="federated", clients=partitions, rounds=2,
                         local_steps=2, dataset=f"npz:{tmp_path / 'digits.npz'}", min_clients=2,
                         sample_dp=True, noise_multiplier=1.0, client_dp="server", client_dp_noise=0.5,
                         client_dp_clip=1.0)
    config.save(tmp_path / "run.json")

    keys = ["claimant-a", "claimant-b", "honest1", "victim", *ATTACKS]
    fed = Deployment(tmp_path, keys)
    trace = tmp_path / "hostile.jsonl"
    try:
        fed.start_superlink()
        ids = {name: fed.register(name) for name in keys}
        # Of two nodes naming one partition the server keeps the one with the lower node id: that
        # is the honest holder of partition 0, the other the thief.
        holder, thief = sorted(("claimant-a", "claimant-b"), key=ids.get)
        roles = {"holder": holder, "thief": thief, "honest1": "honest1", "victim": "victim"}
        for role, partition in (("holder", 0), ("honest1", 1), ("victim", 2), ("thief", 0)):
            fed.supernode(role, "--auth-supernode-private-key", str(fed.certs / f"{roles[role]}.key"),
                          partition=partition, partitions=partitions)
        for partition, attack in enumerate(ATTACKS, start=3):
            fed.start(attack, sys.executable, __file__, attack, f"127.0.0.1:{fed.port}", str(fed.certs / "ca.crt"),
                      str(fed.certs / f"{attack}.key"), str(partition), str(partitions), str(trace))
        fed.wait_online(list(ids.values()))

        run = fed.start("flwr-run", str(Path(sys.executable).parent / "flwr"), "run", str(ROOT / "server/flower_app"),
                        "test", "--stream", "-c", f"config='{tmp_path / 'run.json'}'")
        # The victim's SuperNode disappears (kill -9 of it and its processes) while its
        # ClientApp trains in round 1 (its second ClientApp: the first answered the query).
        victim = fed.started["victim"]
        deadline = time.time() + 120
        while time.time() < deadline and not ("Receiving: train message" in fed.log("victim")
                                               and clientapp_running(victim.pid)):
            time.sleep(0.2)
        assert "Receiving: train message" in fed.log("victim"), fed.log("victim")[-2000:]
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        assert run.wait(timeout=240) == 0, fed.log("flwr-run")[-3000:]
        print(f"the run ended {time.time() - killed_at:.0f} s after the kill")
        assert "Sent successfully" not in fed.log("victim").split("Receiving: train message")[-1]
    finally:
        fed.stop()

    out = tmp_path / "runs/attacked"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    log = (out / "train.log").read_text()
    superlink = fed.log("superlink")
    pushed = [json.loads(line) for line in trace.read_text().splitlines()]
    by_node = {ids[attack]: attack for attack in ATTACKS}

    # Both rounds aggregate the four well-formed replies (holder, honest1, duplicate's first,
    # late's); the guard drops wrong-schema's and huge's, each round, with a log line naming the
    # node; the victim's message fails in round 1, and it is no longer online in round 2.
    assert [(r["round"], r["aggregated"], r["clients-replied"], r["dropped"], r["failed"]) for r in history] == \
        [(1, True, 4, 2, 1), (2, True, 4, 2, 0)], history
    for round_ in (1, 2):
        assert f"round {round_}: dropped the reply of node {ids['wrong-schema']}: arrays not in the model: " \
               f"['d.backdoor.weight']; missing:" in log
        assert re.search(rf"round {round_}: dropped the reply of node {ids['huge']}: array \S+ moves 1e\+30 "
                         rf"from the global model sent", log)
    assert "round 1: 1 client(s) failed: Error: Node Unavailable" in log
    # The SuperLink keeps one reply per message. While it holds the first, the identical reply
    # again is that reply (no second row) and a different one is refused as a duplicate; once
    # the server has pulled it, the message is gone and any further reply is refused, as is the
    # late reply to round 1's message. The guard never saw a second reply.
    def pushes(attack, what):
        return [p for p in pushed if by_node.get(p["node"]) == attack and p.get("pushed") == what]

    assert len(pushes("duplicate", "the same reply again")) == len(pushes("duplicate", "a second reply")) == 2
    for second in pushes("duplicate", "a second reply"):
        assert (f"duplicate reply for reply_to_message_id {second['reply_to']}" in superlink
                or f"message_id {second['reply_to']} does not exist" in superlink), superlink[-3000:]
    late = pushes("late", "late")
    assert len(late) == 1 and f"message_id {late[0]['reply_to']} does not exist or has expired" in superlink
    assert "second reply from this node" not in log and "not to this round's" not in log
    # The thief was asked its partition, then never sent a round.
    assert f"node {ids[thief]} also claims partition 0, which node {ids[holder]} holds" in log
    assert fed.log("thief").count("Receiving: query message") == 1 and "Receiving: train" not in fed.log("thief")

    # The privacy record is the server's own accounting of what it sent: every partition in
    # round 1, every partition but the victim's in round 2 (it was offline); nothing a hostile
    # node sent or claimed moved it.
    data = load_data(config.data)
    plan = sample_dp_plan(config, data)
    honest = GlobalModel(config, data, RunDir(tmp_path / "honest"))
    for record, sent in zip(history, ([0, 1, 2, 3, 4, 5, 6], [0, 1, 3, 4, 5, 6])):
        expected = {**privacy_record(config, record["round"], data),
                    **honest.account_sample_dp([plan[p] for p in sent])}
        assert {k: record[k] for k in expected} == expected
    checkpoint = load_state(out / "checkpoints/last.safetensors")
    assert checkpoint["round"] == 2 and checkpoint["server_state"]["sample_dp"] == honest.server_state["sample_dp"]
    assert all(np.isfinite(v.numpy()).all() for v in checkpoint["G"].values())
