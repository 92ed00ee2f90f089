"""The federated study: IID vs Dirichlet label skew, each without and with client-level DP.

    gankit study federated                                   # small, 2 CPU cores
    gankit study federated --rows iid,iid-cdp --set rounds=2 --set local_steps=5 \
        --set g_width=8 --set d_width=8 --samples 200 --out /tmp/fed_tiny     # a quick check

Each row of the config is one simulated federation (Flower's simulation engine, the
project's ClientApp and server: `server/simulation.py`), with the same seed, data and base
options and the row's own options on top (partition, Dirichlet alpha, client-level DP).
The global generator is evaluated centrally on the reference split every round (the
history's FID per round) and, at the end, on more samples with downstream accuracy.
Outputs in --out (default runs/<config name>/; pass --out experiments/results/<config name> to update
the committed results):

    table.csv, table.md   partition, alpha, client-level DP, epsilon (client-level, inf without
                          DP), precision, recall, density, coverage, FID, downstream accuracy,
                          train time
    fid_per_round.png     the global G's FID after every round, one line per row
    samples/<row>.png     a sample grid per row (one column per class)
    partitions/<row>.png  each row's per-client class histogram
    evaluations/<row>.json, histories/<row>.jsonl
                          what the committed results keep of each row: its table row (keyed by
                          what it measured) and its history, so the table and the plot are
                          rebuilt with --evaluate-only where the run folders are absent
    runs/<row>/           the runs (a finished run is reused, an interrupted one resumes)
"""

import functools
import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional

from gankit.studies import (Evaluations, chosen_rows, command_line, held_row, on_ray, read_spec,
                            row_configs, same_training, start_afresh, study_config, study_out,
                            study_parser, train_rows, write_csv)
from gankit.config import Config
from gankit.errors import StudyError
from gankit.data import load_data
from gankit.evaluate import (Reference, draw_samples, evaluate_samples, markdown_table,
                              metric_classifier)
from gankit.runs import RunDir
from gankit.federated import LOSS_METRICS, GlobalModel, pack, unpack
from gankit.server.simulation import Interrupted, simulate
from gankit.trainer import Trainer
from gankit.sampling import load_generator
from gankit.server.strategy import sampled_clients

log = logging.getLogger("gankit")

TABLE_COLUMNS = ["row", "data", "partition", "alpha", "clients", "client_dp", "client_dp_noise", "client_dp_clip", "client_optimizer",
                 "epsilon", "precision", "recall", "density", "coverage", "fid", "downstream_accuracy",
                 "rounds", "local_steps", "total_d_steps", "train_time_s", "round_time_s", "peak_rss_mb"]


def round_costs(history: Path) -> dict:
    """A row's median seconds per round and the peak memory its history recorded (MiB; rows
    trained before the toolkit recorded memory have none)."""
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    times = [r["round_time_s"] for r in records if "round_time_s" in r]
    peaks = [r["peak_rss_mb"] for r in records if "peak_rss_mb" in r]
    return {"round_time_s": round(statistics.median(times), 2) if times else "",
            "peak_rss_mb": max(peaks) if peaks else ""}


def study_base(spec: dict, args) -> dict:
    """A study's base options as this script trains them: its seed, federated mode and data root."""
    base = dict(spec["base"], seed=args.seed, mode="federated")
    if args.data_root:
        base["data_root"] = args.data_root
    return base


def evaluation_key(ev: dict, seed: int, config: Config) -> dict:
    """What a committed evaluation must have measured to be tabled for this row."""
    return {"evaluation": ev, "seed": seed, "rounds": config.federated.rounds}


def committed_row(evaluations: Evaluations, name: str, key: dict, config: Config) -> Optional[dict]:
    """A row's committed table row, if its evaluation measured this configuration with these
    settings (else None, and the log says why)."""
    cached = evaluations.matching(name, key, config)
    if cached is None:
        log.info("[%s] no run here%s; skipped", name,
                 " and its committed evaluation measured another configuration or "
                 "other settings" if evaluations.path(name).is_file() else "")
        return None
    log.info("[%s] no run folder here; its committed evaluation is tabled", name)
    # The same training, so its DP columns are the config's (also those added to the table
    # after the row was committed).
    return {**cached["row"], **client_dp_columns(config)}


def client_dp_columns(config: Config) -> dict:
    f = config.federated
    private = f.client_dp != "none"
    return {"client_dp": f.client_dp, "client_dp_noise": f.client_dp_noise if private else "",
            "client_dp_clip": f.client_dp_clip if private else ""}


def included_rows(spec: dict, config_path: Path, args, ev: dict) -> tuple[list, dict, dict]:
    """The rows that the config's "include" names from other studies' committed results:
    [{"config": path, "results": folder, "rows": [names]}], paths relative to this config's
    folder. Each row is checked against its own study's config and evaluation settings, as
    that study's own --evaluate-only rebuild checks it."""
    rows, configs, histories = [], {}, {}
    for entry in spec.get("include", []):
        other_path, results = (config_path.parent / entry[k] for k in ("config", "results"))
        other = json.loads(other_path.read_text())
        if other["evaluation"] != ev:  # e.g. a quick check's --samples
            log.info("include: %s evaluates with %s, this table with %s; its rows are left out",
                     other_path.name, other["evaluation"], ev)
            continue
        missing = set(entry["rows"]) - set(other["rows"])
        if missing:
            raise StudyError(f"include: {other_path.name} has no rows {sorted(missing)}")
        base = study_base(other, args)
        wanted = {n: o for n, o in other["rows"].items() if n in entry["rows"]}
        built = row_configs({**other, "rows": wanted}, base, "", [], results / "runs")
        for name, config in built.items():
            row = committed_row(Evaluations(results), name, evaluation_key(ev, args.seed, config), config)
            if row is not None:
                rows.append(row)
                configs[name] = config
                histories[name] = results / "histories" / f"{name}.jsonl"
    return rows, configs, histories


def included_section(spec: dict, included: list) -> str:
    if not included:
        return ""
    return (f"\n## Rows from other studies\n\n{spec.get('include_note', '')}\n\n"
            + markdown_table(included, TABLE_COLUMNS))


# Each row's study wall time (the simulation with Ray's start and the per-round evaluation),
# summed over the segments of an interrupted row, kept in the row's own folder so that rows
# training at once in Ray tasks never write one file together.
ROW_TIME = "study_train_time.json"


def row_seconds(run: RunDir) -> Optional[float]:
    path = run.path / ROW_TIME
    return float(json.loads(path.read_text())["train_time_s"]) if path.is_file() else None


def add_row_seconds(run: RunDir, seconds: float) -> float:
    total = round((row_seconds(run) or 0.0) + seconds, 1)
    (run.path / ROW_TIME).write_text(json.dumps({"train_time_s": total}))
    return total


def finished(run: RunDir, config: Config, name: str) -> bool:
    """Whether the row's folder holds this configuration trained to its last round; a folder
    of another configuration is refused rather than overwritten."""
    if not run.checkpoint_path("last").exists():
        return False
    ckpt = run.load_checkpoint("last")
    if not same_training(ckpt["config"], config):
        raise StudyError(f"[{name}] {run.path} holds a run of another configuration; "
                         "remove it or choose another --out")
    return ckpt["round"] >= config.federated.rounds


def train_federated_row(name: str, config: Config, data, runs_dir: Path) -> Optional[float]:
    """Simulate (or reuse, or resume) one row's federation; returns the row's study seconds."""

    run = held_row(runs_dir, name)
    try:
        if finished(run, config, name):
            log.info("[%s] reusing the finished run in %s", name, run.path)
            return row_seconds(run)
        resume = run.checkpoint_path("last").exists()  # an interrupted study continues
        if not resume:
            start_afresh(run)
            run = RunDir.create(config)
        log.info("[%s] federated training: %s", name, run.path)
        classifier = metric_classifier("", data.image_shape, data.num_classes)
        started = time.perf_counter()
        try:
            simulate(config, data, run, resume=resume, classifier=classifier)
        finally:  # an interrupted segment counts too: the next run continues from its last round
            seconds = add_row_seconds(run, time.perf_counter() - started)
        return seconds
    finally:
        run.unlock()


def train_centralized_row(name: str, config: Config, data, runs_dir: Path) -> Optional[float]:
    """The centralized baseline of a federation: the same model, data, seed and initial
    weights, trained by the standard loop on all the data for exactly the federation's total
    steps (clients x local steps a round, D and G alike), and recorded every "round" of that
    many steps by the same global model (evaluation, grid, history), so that its FID curve
    lies on the federated rounds' axis. A short row: an interrupted one starts again."""

    f = config.federated
    run = held_row(runs_dir, name)
    try:
        if run.checkpoint_path("last").exists():
            ckpt = run.load_checkpoint("last")
            if same_training(ckpt["config"], config) and ckpt["round"] >= f.rounds:
                log.info("[%s] reusing the finished run in %s", name, run.path)
                return row_seconds(run)
        start_afresh(run)
        run = RunDir.create(config)
        classifier = metric_classifier("", data.image_shape, data.num_classes)
        model = GlobalModel(config, data, run, classifier)
        local = config.updated({"mode": "standard", "tensorboard": False, "progress": False, "eval_every": 0})
        trainer = Trainer(local, data, None)
        unpack(model.weights, trainer.G, trainer.D, trainer.prior)  # the federation's round-0 weights
        log.info("[%s] centralized training, %d rounds of %d steps: %s", name, f.rounds,
                 f.clients * f.local_steps, run.path)
        started = time.perf_counter()
        model.start_clock()
        for server_round in range(1, f.rounds + 1):
            stats = trainer.train_steps(f.clients * f.local_steps)
            model.end_round(server_round, pack(trainer.G, trainer.D, trainer.prior),
                            {k: float(v) for k, v in stats.items() if k in LOSS_METRICS})
        model.recorder.close()
        return add_row_seconds(run, time.perf_counter() - started)
    finally:
        run.unlock()


def train_study_row(name: str, config: Config, data, runs_dir: Path,
                    centralized: frozenset = frozenset()) -> Optional[float]:
    """One row of this study: a federation, or a centralized baseline where the config marks it."""
    train = train_centralized_row if name in centralized else train_federated_row
    return train(name, config, data, runs_dir)


def evaluate_row(name: str, config: Config, run_path: Path, ref, classifier, ev: dict, seed: int,
                 central: bool = False):
    gen = load_generator(run_path)
    images, labels, _ = draw_samples(gen, ev["samples"], seed)
    metrics, _ = evaluate_samples(ref, classifier, images, labels,
                                  downstream_epochs=ev["downstream_epochs"], seed=seed)
    f = config.federated
    last = RunDir(run_path).history()[-1]
    row = {"row": name, "partition": "centralized" if central else f.partition,
           "alpha": f.dirichlet_alpha if f.partition == "dirichlet" and not central else "",
           "clients": 1 if central else f.clients,
           **client_dp_columns(config),
           "client_optimizer": "" if central else f.client_optimizer,
           "epsilon": float(last.get("client_epsilon", math.inf)), "rounds": f.rounds,
           "local_steps": f.local_steps * (f.clients if central else 1),
           # The clients of a round: all of them, or the sampled fraction (in expectation
           # under --client-dp poisson); a centralized row's "clients" are its batches a round.
           "total_d_steps": f.rounds * f.local_steps * sampled_clients(config),
           **metrics}
    return row


def plot_fid_per_round(path: Path, histories: dict[str, Path], configs: dict[str, Config],
                       centralized: set) -> None:
    """FID of the global G after every round against the total D steps so far: a colour per
    row, squares for Dirichlet partitions, dashed with client DP."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours: dict = {}
    centralized_styles: dict = {}
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for name, history in histories.items():
        records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        f = configs[name].federated
        # x: D steps of all clients together, so rows with other local steps (or the
        # centralized row, whose "round" is that many steps) share the axis.
        per_round = f.clients * f.local_steps
        points = [(r["round"] * per_round, r["fid"]) for r in records if "fid" in r]
        if not points:
            continue
        if name in centralized:
            style = centralized_styles.setdefault(name, ("-", ":", "-.")[len(centralized_styles) % 3])
            ax.plot(*zip(*points), style, lw=2.2, color="black", label=f"{name} (same total steps)")
            continue
        # tab20: a study has more than matplotlib's 10 default colours of rows.
        colour = colours.setdefault(name, plt.get_cmap("tab20")(len(colours) % 20))
        marker = "s" if f.partition == "dirichlet" else "o"
        ax.plot(*zip(*points), ("-" if f.client_dp == "none" else "--") + marker, ms=3.5,
                color=colour, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("D steps, all clients together (clients x local steps a round)")
    ax.set_ylabel("FID (classifier features, lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, not over, the curves
    ax.set_title("Global generator after each round (circles: IID, squares: Dirichlet;\n"
                 "solid: no DP, dashed: client-level DP; lines that coincide overlap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_client_dp_map(path: Path, table: list, histories: dict[str, Path], configs: dict[str, Config]) -> None:
    """Client-level epsilon against quality. Left: each client-DP row's in-training FID against
    the epsilon spent by that round (so one run maps epsilon over rounds), its final FID as a
    marker; right: final downstream accuracy against epsilon. Rows without DP are dashed
    horizontal lines: what the same federation reaches without clipping or noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10")
    for i, row in enumerate(table):
        name, colour = row["row"], colours(i % 10)
        if configs[name].federated.client_dp == "none":
            for ax, metric in ((left, "fid"), (right, "downstream_accuracy")):
                if isinstance(row.get(metric), (int, float)):
                    ax.axhline(row[metric], ls="--", lw=1.2, color=colour, label=f"{name} (no DP)")
            continue
        records = [json.loads(line) for line in histories[name].read_text().splitlines() if line.strip()]
        points = [(r["client_epsilon"], r["fid"]) for r in records if "fid" in r and "client_epsilon" in r]
        if points:
            left.plot(*zip(*points), "-o", ms=3, lw=1.2, color=colour, label=name)
        left.plot(row["epsilon"], row["fid"], "*", ms=11, color=colour)
        right.plot(row["epsilon"], row["downstream_accuracy"], "o", ms=7, color=colour, label=name)
    left.set_yscale("log")
    left.set_xlabel("client-level epsilon spent so far (RDP)")
    left.set_ylabel("FID (classifier features, lower is better)")
    left.set_title("over rounds (in-training FID; star: final evaluation)", fontsize=9)
    right.axhline(0.8, color="grey", lw=0.8, ls=":", label="80% target")
    right.set_xlabel("client-level epsilon (RDP)")
    right.set_ylabel("downstream accuracy (real test split)")
    right.set_title("final generator", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = study_parser(__doc__.splitlines()[0], study_config("federated_small.json"), device=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = read_spec(args.config)
    out = study_out(args)
    for sub in ("samples", "partitions", "histories"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ev = dict(spec["evaluation"])
    if args.samples:
        ev["samples"] = args.samples
    base = study_base(spec, args)
    # Rows marked {"centralized": true} are trained by train_centralized_row.
    centralized = frozenset(name for name, o in spec["rows"].items() if o.get("centralized"))
    rows = {name: {k: v for k, v in o.items() if k != "centralized"} for name, o in spec["rows"].items()}
    # --rows chooses what trains; the table lists every row of the config that is measured.
    configs = row_configs({**spec, "rows": rows}, base, "", args.set, out / "runs")
    wanted = chosen_rows(spec, args.rows)
    data = load_data(next(iter(configs.values())).data)
    log.info("data: %s", data.description)
    classifier = metric_classifier("", data.image_shape, data.num_classes)
    ref = Reference.of(classifier, data.ref_x, data.ref_y)

    started = time.perf_counter()
    times_path = out / "train_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if not args.evaluate_only:

        to_train = {name: config for name, config in configs.items() if name in wanted}
        if on_ray(args, to_train):
            # A Flower simulation cannot start its own Ray inside a Ray task, so there each
            # row's clients run inline, one after another in the row's task (the same model
            # with every client sampled; server/simulation.py). The engine is a placement
            # option: a finished row is the same row either way.
            to_train = {n: c.updated({"simulation": "inline"}) for n, c in to_train.items()}
        try:
            seconds = train_rows(to_train, data, out / "runs", args,
                                 train=functools.partial(train_study_row, centralized=centralized))
        except Interrupted as stopped:
            log.warning("%s; stopped at a round's end (Ctrl-C), its checkpoint saved: run the "
                        "same command to continue", stopped)
            return 130
        # Re-read first: another study process may have trained other rows into this folder.
        times = json.loads(times_path.read_text()) if times_path.exists() else {}
        times.update({name: s for name, s in seconds.items() if s is not None})
        times_path.write_text(json.dumps(times, indent=1))

    table, histories = [], {}
    evaluations = Evaluations(out)
    for name, config in configs.items():
        run = RunDir(out / "runs" / name)
        key = evaluation_key(ev, args.seed, config)
        if not run.checkpoint_path("last").exists():
            # A row trained on another machine: its committed evaluation and history are the
            # evidence (run folders stay out of git), if they measured what this table does.
            row = committed_row(evaluations, name, key, config)
            if row is not None:
                table.append(row)
                histories[name] = out / "histories" / f"{name}.jsonl"
            continue
        ckpt = run.load_checkpoint("last")
        if not same_training(ckpt["config"], config) or ckpt["round"] < config.federated.rounds:
            log.info("[%s] not trained to its %d rounds yet; skipped", name, config.federated.rounds)
            continue
        cached = evaluations.matching(name, key, config)
        if cached and cached.get("train_time_s") == times.get(name):
            row = cached["row"]  # the same run, already measured
        else:
            row = evaluate_row(name, config, run.path, ref, classifier, ev, args.seed, name in centralized)
            row["train_time_s"] = times.get(name, math.nan)
            evaluations.save(name, key, config, train_time_s=times.get(name), row=row)
        table.append(row)
        shutil.copy(run.history_path, out / "histories" / f"{name}.jsonl")
        histories[name] = out / "histories" / f"{name}.jsonl"
        # The final round's grid (toolkit/recorder.py: a column per class, fixed latents).
        shutil.copy(run.path / "samples" / f"round_{config.federated.rounds:03d}.png",
                    out / "samples" / f"{name}.png")
        if (run.path / "partition.png").exists():  # not for a centralized row
            shutil.copy(run.path / "partition.png", out / "partitions" / f"{name}.png")
        log.info("[%s] epsilon=%.3g fid=%.3g precision=%.3g recall=%.3g downstream=%.3g", name,
                 row["epsilon"], row["fid"], row["precision"], row["recall"],
                 row.get("downstream_accuracy", math.nan))

    included, included_configs, included_histories = included_rows(spec, Path(args.config), args, ev)
    all_configs, all_histories = {**configs, **included_configs}, {**histories, **included_histories}
    for row in table + included:
        row.update(round_costs(all_histories[row["row"]]))
        row["data"] = all_configs[row["row"]].data.dataset
    write_csv(out / "table.csv", table + included, TABLE_COLUMNS)
    # Included rows have their own data and reference, so their FIDs stay off this plot.
    plot_fid_per_round(out / "fid_per_round.png", histories, configs, centralized)
    # The map: the client-DP rows and the rows without DP trained on the same data.
    dp_data = {r["data"] for r in table + included if all_configs[r["row"]].federated.client_dp != "none"}
    if dp_data:
        plot_client_dp_map(out / "client_dp_map.png", [r for r in table + included if r["data"] in dp_data],
                           all_histories, all_configs)
    total = time.perf_counter() - started
    command = command_line()
    (out / "table.md").write_text(
        f"# Federated study: {Path(args.config).stem}\n\n{spec.get('description', '')}\n\n"
        f"Reference: {data.description} ({len(data.ref_x):,} images). {ev['samples']:,} samples of "
        f"the final global generator per row. epsilon: client-level (add/remove one client's "
        f"whole data, RDP; amplified by sampling only for --client-dp poisson, whose clients join "
        f"at random; inf: no DP). train_time_s: wall time of the simulation including Ray's "
        f"start and the per-round evaluation; round_time_s: the median round; peak_rss_mb: the "
        f"study process's peak memory (with --simulation inline, every client's). Total time "
        f"{total / 60:.1f} min.\n\nCommand: `{command}`\n\n" + markdown_table(table, TABLE_COLUMNS)
        + "\n![FID per round](fid_per_round.png)\n" + included_section(spec, included)
        + ("\n![Client-level epsilon against quality](client_dp_map.png)\n" if dp_data else ""))
    log.info("wrote %s (%.1f min)", out / "table.md", total / 60)
    return 0

