"""The server's aggregation: a Flower strategy chosen by --strategy, inside a reply guard.

    fedavg, fedavgm, fedprox, fedadam
                                    (FedProx's proximal term is applied by the clients;
                                    FedAvgM: --server-step, --server-momentum)
    fedmedian, trimmed-mean, krum   robust to a minority of bad clients
    --client-dp server|client       Flower's DP-FedAvg wrappers (fixed clipping) around
                                    fedavg/fedprox, whose mean has a fixed denominator
                                    (FixedDenominator); the server reports epsilon

`ReplyGuard` wraps any Flower strategy (the way Flower's DP wrappers do) and is the trust
boundary between the clients and the aggregation. A client reply reaches the strategy only
when it
- carries no error and comes from a node that was sent this round, once, in reply to the
  message this round sent it;
- holds exactly the global model's arrays (same keys, shapes and dtypes, finite values, none
  further than MAX_STEP from the global model the node was sent) and exactly the expected
  metrics (integers where integers belong, finite numbers elsewhere, counts within what the
  server planned);
- names the partition its node holds and, under sample-level DP, echoes what the server sent
  its node (noise multiplier, steps; see `PartitionAssignments`);
- under --client-dp client, holds an update no longer than the clipping norm (up to float
  rounding: `clipped_norm_allowance`): a client that skipped its clipping is dropped.
Any other reply is dropped, counted and logged; it never ends the round. Every accepted reply
weighs the same (the server does not take a client's word for its example count). A round with
fewer than --min-clients accepted replies keeps the previous global model. The guard numbers
rounds from where a resumed run left off (clients seed their batch order by it) and keeps what
each round did in `outcome` (a RoundOutcome).

Under client-level DP (--client-dp server|client) a dropped reply or a failed client does not
weaken the noise: the mean inside Flower's wrapper divides the accepted clipped updates' sum by
the number of clients sent the round, not by the number accepted (`FixedDenominator`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy

from gankit.config import Config
from gankit.federated import reply_metric_types, split_for_sync
from gankit.server.dp_fedavg import PoissonDPFedAvg

log = logging.getLogger("gankit")


# The furthest any value of a reply may lie from the global model its node was sent. It keeps
# out what no honest client sends and what would break the server's arithmetic (a reply of
# 1e30s leaves a plain mean of 1e29s, and its square, in a server optimizer's second moment or
# a DP wrapper's norm, is infinite), and nothing an honest client could: Adam moves a weight by
# at most lr (1 - beta1) / sqrt(1 - beta2) a step (Kingma and Ba 2015, 2.1), about 16 lr, so the
# project's largest configurations (lr 8e-4, 50 local steps) move a weight by less than 1.
# Within the bound a well-formed update is averaged in: it can still ruin a plain mean, which
# only the robust strategies or client-level DP's clipping prevent.
MAX_STEP = 1e6
# Under --client-dp server, Flower's clipping divides by each update's norm (float32): a reply
# that leaves the model where it was (norm 0, or values so close that their squares underflow)
# would raise ZeroDivisionError and end the run. Below this norm a reply is dropped; no honest
# round moves the weights that little.
MIN_CLIPPED_NORM = 1e-12
# Under --client-dp client each client clips its own update to norm C (Flower's
# fixedclipping_mod) and the guard drops a reply whose update is longer: a client that skips the
# clipping (a hostile or misconfigured one) would move the model by more than the noise hides.
# What an honest clipped update measures here differs from C by float32 rounding, which the
# guard allows for (`clipped_norm_allowance`); beyond it, a relative CLIP_TOLERANCE.
CLIP_TOLERANCE = 1e-6


def clipped_norm_allowance(clip: float, reply_norm: float, largest_array: int, unit_roundoff: float) -> float:
    """The longest update (L2, float64, over the floating arrays) that an honest client clipping
    to `clip` with Flower's fixedclipping_mod can send back: clip (1 + CLIP_TOLERANCE + u sqrt(n))
    + u ||reply||, u the arrays' unit roundoff (2^-24 for float32).

    - u sqrt(n): the client measures its update's norm with float32 sums, one array at a time;
      for an array of n values their relative error is about u sqrt(n) (Higham 2002, 4.2), and
      an underestimated norm clips to a little more than C (measured: 5e-7 for 1e6 values,
      1.6e-5 for 1e7, 7.7e-5 for 3e7; the bound's 6e-5, 1.9e-4, 3.3e-4).
    - u ||reply||: the client sends global + clipped update rounded to float32, at most u |value|
      from it a value. With weights of about 1 and a small C this is what dominates (1e6 values,
      C 0.01: 4e-6 over C).
    """
    return clip * (1.0 + CLIP_TOLERANCE + unit_roundoff * math.sqrt(largest_array)) + unit_roundoff * reply_norm


def sampled_clients(config: Config) -> int:
    """How many clients Flower samples each round (it takes max(int(N * fraction), minimum))."""
    f = config.federated
    return max(1, int(f.clients * f.fraction_train))


def array_schema(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype, in the record's order."""
    schema = {}
    for key, value in arrays.items():
        array = value.numpy()
        schema[key] = (array.shape, array.dtype)
    return schema


def last_line_of_error(reply: Message) -> str:
    """A failed client's error in one line (a traceback's last line says what happened)."""
    reason = reply.error.reason.strip()
    return reason.splitlines()[-1][:200] if reason else "no reason given"


@dataclass
class RoundOutcome:
    """What one round did, as the guard saw it."""
    round: int
    # node id -> what it was asked beyond the shared config; None: this guard sent nothing
    # this round (aggregate_train called on its own, as a test may)
    sent: Optional[dict[int, dict]] = None
    received: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (node, error): the client raised or vanished
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (node, reason): refused by the guard
    accepted: int = 0
    aggregated: bool = False
    metrics: dict = field(default_factory=dict)  # the strategy's aggregated train metrics


class PartitionAssignments:
    """Which partition each node trains, and (sample-level DP) what the server asks of it.

    A node's partition is the one thing the server asks of the node: once per run, before
    its first round (a query message answered from the node's own `partition-id`), and
    fixed from then on. A second node claiming a partition that another node holds is not
    sent rounds (one partition's data must not count twice), with a log line. Under
    sample-level DP the server plans every partition's noise multiplier and steps
    (gankit.federated.sample_dp_plan) and sends each node its partition's entry in the
    train config; the account is kept from these records, not from the replies. Without it
    the plan entries are empty.
    """

    QUERY_TIMEOUT_S = 600.0

    def __init__(self, plan: list[dict]):
        self.plan = plan
        self.partition_of: dict[int, int] = {}  # node id -> partition, learnt this run
        self.duplicates: set[int] = set()       # nodes that claimed a held partition
        # Sample-level DP: each node is sent its plan, and every reply must echo it.
        self.carries_plan = any(plan)

    def learn_partitions(self, nodes: list[int], grid: Grid) -> None:
        unknown = [n for n in nodes if n not in self.partition_of and n not in self.duplicates]
        if not unknown:
            return
        queries = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in unknown]
        replies = grid.send_and_receive(queries, timeout=self.QUERY_TIMEOUT_S)
        # In node order, so that which of two claimants keeps a partition does not depend
        # on who answered first.
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            partition, problem = self._claimed_partition(reply)
            if partition is None:
                log.warning("node %d names no partition of 0..%d (%s); it is not sent "
                            "a round until it does", node, len(self.plan) - 1, problem)
                continue
            holder = next((n for n, p in self.partition_of.items() if p == partition), None)
            if holder is not None:
                log.warning("node %d also claims partition %d, which node %d holds; it is not "
                            "sent rounds", node, partition, holder)
                self.duplicates.add(node)
                continue
            self.partition_of[node] = partition

    def _claimed_partition(self, reply: Message) -> tuple[Optional[int], str]:
        if reply.has_error():
            return None, last_line_of_error(reply)
        if not reply.has_content() or "node" not in reply.content.metric_records:
            return None, "no answer"
        facts = reply.content["node"]
        partition, partitions = facts.get("partition-id"), facts.get("num-partitions")
        if type(partition) is not int or not 0 <= partition < len(self.plan) or \
                partitions not in (None, len(self.plan)):
            return None, f"partition-id {partition!r} of num-partitions {partitions!r}"
        return partition, ""

    def assign(self, messages: list[Message], grid: Grid) -> list[tuple[Message, dict]]:
        """Each message with its node's assignment (its partition as "client", and the plan's
        entry) added to its config; nodes without a partition are left out of the round."""
        self.learn_partitions([m.metadata.dst_node_id for m in messages], grid)
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.partition_of:
                continue
            partition = self.partition_of[node]
            assignment = {"client": partition, **self.plan[partition]}
            content = RecordDict(dict(message.content.items()))
            # Each node gets its own config record: Flower's strategies share one between messages.
            content["config"] = ConfigRecord({**message.content["config"], **assignment})
            out.append((Message(content, dst_node_id=node, message_type=message.metadata.message_type),
                        assignment))
        return out


class FixedDenominator:
    """The fixed-denominator mean, mixed into the FedAvg (or FedProx) inside Flower's DP wrappers
    (--client-dp server|client; McMahan et al. 2018's estimator, as --client-dp poisson's).

    Flower's wrappers add Gaussian noise of std z C / M (M: num_sampled_clients) to what the
    strategy inside returns. FedAvg's mean of the m' replies that reach it has sensitivity C / m':
    every reply the guard drops and every client that fails would lower the noise multiplier to
    z m' / M, under the epsilon recorded for z. This strategy returns instead

        global + (sum of the accepted clipped updates) / m,    m = max(sent, M),

    `sent` being the clients the guard sent the round (it tells the strategy: `start_round`).
    One client's data moves that sum by at most C whatever m' is, so the sensitivity is C / m
    <= C / M and the noise multiplier at least z: exactly z when the guard sent M clients (the
    usual case; it sends fewer when a sampled node holds no partition, more when extra connected
    nodes and --fraction-train < 1 let Flower sample more, then with more noise than recorded).
    A round in which every client sent is accepted (m' = m) returns FedAvg's own mean, bit for
    bit what the wrapped FedAvg returned before this estimator. The arrays that are not floating
    point (BatchNorm's step counters, which Flower's clipping leaves as they are) keep the mean
    of the accepted replies.
    """

    def __init__(self, *args, num_sampled_clients: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_sampled_clients = num_sampled_clients
        self.started: Optional[int] = None  # the round start_round was told of
        self.global_arrays: dict[str, np.ndarray] = {}
        self.denominator = num_sampled_clients

    def start_round(self, server_round: int, global_arrays: dict[str, np.ndarray], sent: int) -> None:
        """This round's global model and the number of clients sent it (from the guard)."""
        self.started, self.global_arrays = server_round, global_arrays
        self.denominator = max(sent, self.num_sampled_clients)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if self.started != server_round:
            raise RuntimeError(f"round {server_round}: the fixed-denominator mean needs the round's global model "
                               f"and clients sent (start_round), and has round {self.started}'s")
        if len(replies) == self.denominator:
            return arrays, metrics  # the plain mean is the estimator
        for key, value in self.global_arrays.items():
            if value.dtype.kind != "f":
                continue
            start = value.astype(np.float64)
            total = np.zeros_like(start)
            for reply in replies:
                total += reply.content[self.arrayrecord_key][key].numpy().astype(np.float64) - start
            arrays[key] = Array(np.asarray((start + total / self.denominator).astype(value.dtype)))
        log.info("round %d: the mean update is the sum of %d accepted update(s) over the %d clients sent "
                 "(client-level DP's fixed denominator)", server_round, len(replies), self.denominator)
        return arrays, metrics


class FixedDenominatorFedAvg(FixedDenominator, flwr_strategies.FedAvg):
    pass


class FixedDenominatorFedProx(FixedDenominator, flwr_strategies.FedProx):
    pass


class ReplyGuard(Strategy):
    """Wraps a Flower strategy: only well-formed replies reach it, each with the same weight.

    Parameters
    ----------
    strategy : the wrapped strategy (Flower's DP wrappers included: the guard goes outside
        them, since they clip and noise whatever they are handed and skip a round with any
        error reply).
    global_arrays : the global model; every reply must match its keys, shapes and dtypes, and
        every aggregate is cast back to its dtypes (a mean of integer counters is a float).
    required_metrics, optional_metrics : metric name -> int or float.
    metric_limits : metric name -> (lowest, highest) value accepted.
    min_replies : fewest accepted replies that update the model.
    min_update_norm : a reply whose update (over the floating arrays, against the global model
        its node was sent) has a smaller L2 norm is dropped (see MIN_CLIPPED_NORM); 0: no bound.
    max_update_norm : a reply whose update has a larger L2 norm, beyond float rounding
        (`clipped_norm_allowance`), is dropped: --client-dp client's clipping norm; inf: no bound.
    round_offset : rounds done before this run started (resume).
    assignments : sample-level DP's per-node assignments, or None.
    """

    def __init__(self, strategy: Strategy, global_arrays: ArrayRecord, required_metrics: dict[str, type],
                 optional_metrics: Optional[dict[str, type]] = None,
                 metric_limits: Optional[dict[str, tuple[float, float]]] = None, *, min_replies: int = 1,
                 round_offset: int = 0, assignments: Optional[PartitionAssignments] = None,
                 min_update_norm: float = 0.0, max_update_norm: float = math.inf,
                 arrays_key: str = "arrays", metrics_key: str = "metrics",
                 weighted_by_key: str = "num-examples", plain_mean_keys: frozenset = frozenset()):
        super().__init__()
        self.strategy = strategy
        # Running statistics and counters (BatchNorm's): a server optimizer's step would
        # extrapolate them like weights (a variance of 3e9 after 20 FedAvgM rounds), so these
        # arrays take the replies' plain mean whatever the strategy did.
        self.plain_mean_keys = frozenset(plain_mean_keys)
        self.schema = array_schema(global_arrays)
        self.required_metrics = dict(required_metrics)
        self.optional_metrics = dict(optional_metrics or {})
        self.metric_limits = dict(metric_limits or {})
        self.min_replies = max(0, min_replies)
        self.min_update_norm, self.max_update_norm = min_update_norm, max_update_norm
        floating = [(math.prod(shape), dtype) for shape, dtype in self.schema.values() if dtype.kind == "f"]
        self.largest_array = max((n for n, _ in floating), default=0)
        self.unit_roundoff = max((float(np.finfo(dtype).eps) / 2 for _, dtype in floating), default=0.0)
        # Client-level DP: the mean inside the DP wrapper, told how many clients each round was sent.
        inner = innermost(strategy)
        self.fixed_denominator = inner if isinstance(inner, FixedDenominator) else None
        self.round_offset = round_offset
        self.assignments = assignments
        self.arrays_key, self.metrics_key, self.weighted_by_key = arrays_key, metrics_key, weighted_by_key
        self.outcome = RoundOutcome(round_offset)
        # This round's messages by node (the grid gives them their ids as it sends them) and
        # the global model's arrays they carried.
        self.messages: dict[int, Message] = {}
        self.sent_arrays: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"ReplyGuard({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    # --- training ------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_ = server_round + self.round_offset
        messages = list(self.strategy.configure_train(round_, arrays, config, grid))
        self.outcome = RoundOutcome(round_)
        if self.assignments is None:
            assigned = [(m, {}) for m in messages]
        else:
            assigned = self.assignments.assign(messages, grid)
        self.outcome.sent = {m.metadata.dst_node_id: assignment for m, assignment in assigned}
        self.messages = {m.metadata.dst_node_id: m for m, _ in assigned}
        self.sent_arrays = {k: a.numpy() for k, a in arrays.items()}
        if self.fixed_denominator is not None:
            self.fixed_denominator.start_round(round_, self.sent_arrays, len(assigned))
        return [m for m, _ in assigned]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        o = self.outcome
        round_ = server_round + self.round_offset
        if o.round != round_:  # aggregate_train without configure_train (as a test may call it)
            o = self.outcome = RoundOutcome(round_)
            self.messages, self.sent_arrays = {}, {}
        accepted, seen = [], set()
        # Ray hands replies over as they arrive; one fixed order keeps the float sums, and so
        # the run, the same from run to run.
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            o.received += 1
            node = reply.metadata.src_node_id
            if reply.has_error():
                o.failed.append((node, last_line_of_error(reply)))
                continue
            problem = self.problem_with(reply, node, seen)
            seen.add(node)
            if problem:
                o.dropped.append((node, problem))
                log.warning("round %d: dropped the reply of node %d: %s", round_, node, problem)
                continue
            accepted.append(reply)
        o.accepted = len(accepted)
        self.prepare_metrics(accepted)
        if o.failed:
            log.warning("round %d: %d client(s) failed: %s", round_, len(o.failed),
                        "; ".join(reason for _, reason in o.failed))
        if o.dropped:
            log.warning("round %d: dropped %d of %d replies", round_, len(o.dropped), o.received)
        if len(accepted) < self.min_replies:
            log.warning("round %d: %d accepted replies, fewer than --min-clients %d: the global model "
                        "stays as it was", round_, len(accepted), self.min_replies)
            return None, None
        arrays, metrics = self.strategy.aggregate_train(round_, accepted)
        if arrays is not None and self.plain_mean_keys:
            self.average_plainly(arrays, accepted)
        o.aggregated = arrays is not None
        o.metrics = dict(metrics) if metrics is not None else {}
        return (None if arrays is None else self.in_schema(arrays)), metrics

    def average_plainly(self, arrays: ArrayRecord, accepted: list[Message]) -> None:
        """Replace the plain-mean arrays of the aggregate, in place (FedAvgM keeps the very
        record it returns as its next starting point), by the equal-weight mean of the replies."""
        for key in self.plain_mean_keys & set(arrays.keys()):
            values = [reply.content[self.arrays_key][key].numpy() for reply in accepted]
            arrays[key] = Array(np.asarray(np.mean(values, axis=0)))

    def prepare_metrics(self, accepted: list[Message]) -> None:
        """Each accepted reply's metrics as the strategy gets them: equal weights, and only the
        metrics every accepted reply has (Flower's strategies refuse replies whose metric keys
        differ, e.g. a g_loss that one client's round did not produce)."""
        if not accepted:
            return
        shared = set.intersection(*(set(r.content[self.metrics_key].keys()) for r in accepted))
        for reply in accepted:
            metrics = {k: v for k, v in reply.content[self.metrics_key].items() if k in shared}
            # Equal weights: every client trains the same --local-steps whatever its share of
            # the data, and DP-FedAvg's noise assumes each of the m sampled updates weighs 1/m.
            metrics[self.weighted_by_key] = 1
            reply.content[self.metrics_key] = MetricRecord(metrics)

    def problem_with(self, reply: Message, node: int, seen: set) -> Optional[str]:
        """Why this reply cannot be aggregated, or None."""
        sent = self.outcome.sent
        if sent is not None and node not in sent:
            return "this node was not sent the round"
        if sent is None and (self.fixed_denominator is not None or
                             (self.assignments is not None and self.assignments.carries_plan)):
            return "no record of what this node was sent"
        if node in seen:
            return "a second reply from this node"
        # Flower's grid pulls only the replies to this round's messages; a reply to another
        # message (an earlier round's) is refused here too.
        if node in self.messages and reply.metadata.reply_to_message_id != self.messages[node].metadata.message_id:
            return f"a reply to message {reply.metadata.reply_to_message_id[:12]!r}, not to this round's"
        if not reply.has_content():
            return "no content"
        content = reply.content
        if set(content.keys()) != {self.arrays_key, self.metrics_key}:
            return f"records {sorted(content.keys())}, expected {sorted([self.arrays_key, self.metrics_key])}"
        if not isinstance(content[self.arrays_key], ArrayRecord) or \
                not isinstance(content[self.metrics_key], MetricRecord):
            return "records of the wrong kind"
        return (self.problem_with_arrays(content[self.arrays_key])
                or self.problem_with_metrics(content[self.metrics_key], (sent or {}).get(node, {})))

    def problem_with_arrays(self, arrays: ArrayRecord) -> Optional[str]:
        keys, expected = set(arrays.keys()), set(self.schema)
        if keys != expected:
            extra, missing = sorted(keys - expected), sorted(expected - keys)
            return "arrays " + "; ".join(part for part in (f"not in the model: {extra[:5]}" if extra else "",
                                                           f"missing: {missing[:5]}" if missing else "") if part)
        squares, reply_squares = 0.0, 0.0  # of the update and of the reply, over the floating arrays
        for key, (shape, dtype) in self.schema.items():
            try:
                value = arrays[key].numpy()  # np.load without pickle (Flower's Array.numpy)
            except Exception as err:  # whatever forged bytes make np.load raise
                return f"array {key} cannot be read ({type(err).__name__}: {str(err)[:80]})"
            if value.shape != shape:
                return f"array {key} has shape {value.shape}, the model's is {shape}"
            if value.dtype != dtype:
                return f"array {key} has dtype {value.dtype}, the model's is {dtype}"
            if not np.isfinite(value).all():
                return f"array {key} is not finite"
            if key in self.sent_arrays:
                moved = np.abs(np.subtract(value, self.sent_arrays[key], dtype=np.float64))
                step = float(np.max(moved, initial=0.0))
                if step > MAX_STEP:
                    return f"array {key} moves {step:.3g} from the global model sent (more than {MAX_STEP:g})"
                if value.dtype.kind == "f":
                    squares += float(np.sum(moved * moved))
                    reply_squares += float(np.sum(np.square(value, dtype=np.float64)))
        if not self.sent_arrays:
            return None
        norm = math.sqrt(squares)
        if norm < self.min_update_norm:
            return f"an update of norm {norm:.3g}, below {self.min_update_norm:g} (the model as it was sent)"
        if norm > self.max_update_norm and norm > clipped_norm_allowance(
                self.max_update_norm, math.sqrt(reply_squares), self.largest_array, self.unit_roundoff):
            return (f"an update of norm {norm:.7g}, longer than the clipping norm {self.max_update_norm:g} "
                    f"(the client did not clip it)")
        return None

    def problem_with_metrics(self, metrics: MetricRecord, sent: dict) -> Optional[str]:
        keys = set(metrics.keys())
        missing = sorted(set(self.required_metrics) - keys)
        extra = sorted(keys - set(self.required_metrics) - set(self.optional_metrics))
        if missing or extra:
            return "metrics " + "; ".join(part for part in (f"missing: {missing}" if missing else "",
                                                            f"unexpected: {extra[:5]}" if extra else "") if part)
        for key, value in metrics.items():
            kind = self.required_metrics.get(key) or self.optional_metrics[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind is int and not isinstance(value, int)):
                return f"metric {key} is {value!r}, not {'an integer' if kind is int else 'a number'}"
            if not math.isfinite(value):
                return f"metric {key} is not finite"
            low, high = self.metric_limits.get(key, (-math.inf, math.inf))
            if not low <= value <= high:
                return f"metric {key} = {value!r} is outside [{low:g}, {high:g}]"
        for key, value in sent.items():
            if not math.isclose(metrics[key], value, rel_tol=1e-9, abs_tol=0.0):
                return f"metric {key} = {metrics[key]!r}, but the server sent {value!r}"
        return None

    def in_schema(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate with the global model's dtypes (and key order), so every round sends
        clients the same schema that their replies are checked against."""
        out = {}
        for key, (_, dtype) in self.schema.items():
            value = arrays[key].numpy()
            out[key] = Array(np.asarray(value.astype(dtype, copy=False)))
        return ArrayRecord(out)

    # --- evaluation: not used by this project, passed through ----------------------------------

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, replies)


class ServerGenerator(Strategy):
    """--sync d: the clients train D alone and the server trains G (Augenstein et al. 2020).

    Outside the guard: the strategy inside it (guard, DP wrappers, aggregation) sees D's
    arrays only, so client-level clipping and noise touch D alone. Each message also carries
    G and the prior under "generator"; after aggregation, `train_generator(d_arrays, round)`
    trains G against the aggregated D and returns the whole new global model.
    """

    def __init__(self, strategy: Strategy, train_generator):
        super().__init__()
        self.strategy = strategy
        self.train_generator = train_generator

    outcome = property(lambda self: self.strategy.outcome)

    def __repr__(self) -> str:
        return f"ServerGenerator({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        trained, sent_only = split_for_sync(arrays.to_torch_state_dict(), "d")
        messages = list(self.strategy.configure_train(server_round, ArrayRecord(trained), config, grid))
        for message in messages:
            message.content["generator"] = ArrayRecord(sent_only)
        return messages

    def aggregate_train(self, server_round, replies):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        round_ = server_round + self.strategy.round_offset
        return ArrayRecord(self.train_generator(arrays.to_torch_state_dict(), round_)), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)


# Per-client facts are not averaged: the sample-level privacy account is the server's own
# (toolkit/federated.py: GlobalModel.account_sample_dp).
PER_CLIENT_FACTS = ("client", "num-examples", "epsilon", "noise-multiplier", "sample-rate", "dp-steps",
                    "delta")


def mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """The mean of the accepted replies' training metrics (the guard weighs replies equally)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    out = {"clients-replied": len(metrics)}
    keys = set.intersection(*(set(m.keys()) for m in metrics)) - {weight_key, *PER_CLIENT_FACTS}
    for key in sorted(keys):
        out[key] = float(np.mean([float(m[key]) for m in metrics]))
    return MetricRecord(out)


# Beyond the global weights, the FedOpt family (FedAdam) carries the server optimizer's
# moments from round to round, and FedAvgM its momentum (a list, in the arrays' order); a
# resumed run must continue them, not restart from zero.
SERVER_OPTIMIZER_STATE = ("m_t", "v_t")
SERVER_MOMENTUM = "momentum_vector"


def innermost(strategy):
    """The strategy inside the guard and the DP wrappers (they keep it as `.strategy`)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


def strategy_state(strategy) -> dict:
    """The strategy's state between rounds (as tensors, for the checkpoint)."""
    inner = innermost(strategy)
    state = {name: {k: torch.from_numpy(np.array(v)) for k, v in getattr(inner, name).items()}
             for name in SERVER_OPTIMIZER_STATE if getattr(inner, name, None)}
    if getattr(inner, SERVER_MOMENTUM, None) is not None:
        state[SERVER_MOMENTUM] = {str(i): torch.from_numpy(np.array(v))
                                  for i, v in enumerate(getattr(inner, SERVER_MOMENTUM))}
    return state


def load_strategy_state(strategy, state: dict) -> None:
    inner = innermost(strategy)
    for name, arrays in (state or {}).items():
        if name == SERVER_MOMENTUM:
            setattr(inner, name, [arrays[str(i)].numpy() for i in range(len(arrays))])
        else:
            setattr(inner, name, {k: v.numpy() for k, v in arrays.items()})


# Strategies that step the global model by their own rule (a server learning rate, momentum,
# Adam): their step must not apply to running statistics.
SERVER_OPTIMIZERS = ("fedavgm", "fedadam")


def build_strategy(config: Config, global_arrays: ArrayRecord, partition_sizes: list[int],
                   round_offset: int = 0, sample_dp_plan: Optional[list[dict]] = None,
                   train_generator=None, statistics_keys: frozenset = frozenset()) -> Strategy:
    """The configured strategy inside the guard (and, with --sync d, the guard inside
    ServerGenerator, which needs `train_generator`). `partition_sizes`: the planned partitions
    (a client's example count must be one the server could have planned). `statistics_keys`:
    the arrays that are running statistics, not weights (gankit.federated.statistics_keys),
    which a server optimizer averages plainly instead of stepping."""
    f = config.federated
    sampled = sampled_clients(config)
    common = dict(fraction_train=f.fraction_train, fraction_evaluate=0.0, min_train_nodes=sampled,
                  min_evaluate_nodes=0, min_available_nodes=f.clients, train_metrics_aggr_fn=mean_metrics)
    base = {"fedavg": (flwr_strategies.FedAvg, {}),
            "fedavgm": (flwr_strategies.FedAvgM, {"server_learning_rate": f.server_step,
                                                  "server_momentum": f.server_momentum}),
            "fedprox": (flwr_strategies.FedProx, {"proximal_mu": f.proximal_mu}),
            "fedadam": (flwr_strategies.FedAdam, {"eta": f.server_lr}),
            "fedmedian": (flwr_strategies.FedMedian, {}),
            "trimmed-mean": (flwr_strategies.FedTrimmedAvg, {"beta": f.trim_fraction}),
            "krum": (flwr_strategies.Krum, {"num_malicious_nodes": f.krum_malicious})}
    cls, extra = base[f.strategy]
    if f.client_dp in ("server", "client"):  # inside Flower's DP wrapper: see FixedDenominator
        cls = {"fedavg": FixedDenominatorFedAvg, "fedprox": FixedDenominatorFedProx}[f.strategy]
        extra = {**extra, "num_sampled_clients": sampled}
    strategy = cls(**common, **extra)
    if f.client_dp == "poisson":
        strategy = PoissonDPFedAvg(f.clients, f.fraction_train, f.client_dp_noise, f.client_dp_clip,
                                   train_metrics_aggr_fn=mean_metrics)
    elif f.client_dp != "none":
        wrapper = {"server": flwr_strategies.DifferentialPrivacyServerSideFixedClipping,
                   "client": flwr_strategies.DifferentialPrivacyClientSideFixedClipping}[f.client_dp]
        strategy = wrapper(strategy, noise_multiplier=f.client_dp_noise, clipping_norm=f.client_dp_clip,
                           num_sampled_clients=sampled)
    required, optional = reply_metric_types(config)
    limits = {"num-examples": (1, max(partition_sizes)), "client": (0, f.clients - 1),
              "local-steps": (f.local_steps, f.local_steps)}
    if f.sample_dp and sample_dp_plan is None:
        raise ValueError("sample-level DP needs the server's plan (gankit.federated.sample_dp_plan)")
    # A reply holds what the clients train: all the model, or D alone (--sync d).
    replied, _ = split_for_sync(global_arrays.to_torch_state_dict(), f.sync)
    # Poisson DP-FedAvg releases every round, even with no reply: skipping would reveal the sample.
    min_replies = 0 if f.client_dp == "poisson" else f.min_clients
    guard = ReplyGuard(strategy, ArrayRecord(replied), required, optional, limits, min_replies=min_replies,
                       round_offset=round_offset,
                       min_update_norm=MIN_CLIPPED_NORM if f.client_dp == "server" else 0.0,
                       max_update_norm=f.client_dp_clip if f.client_dp == "client" else math.inf,
                       plain_mean_keys=statistics_keys if f.strategy in SERVER_OPTIMIZERS else frozenset(),
                       assignments=PartitionAssignments(sample_dp_plan if f.sample_dp
                                                        else [{} for _ in range(f.clients)]))
    if f.sync == "both":
        return guard
    if train_generator is None:
        raise ValueError("--sync d needs the server's G training (GlobalModel.train_generator)")
    return ServerGenerator(guard, train_generator)
