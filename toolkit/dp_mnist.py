"""Private utility on full MNIST, measured as the DP-generation papers measure it.

    gankit study dp-mnist --data-root ../shared/data/mnist                 # runs/dp_mnist_cpu/
    gankit study dp-mnist --data-root ../shared/data/mnist \
        --out experiments/results/dp_mnist                                          # the committed results
    gankit study dp-mnist --data-root ../shared/data/mnist --rows eps10 \
        --set epochs=1 --eval-set train_samples=2000 --eval-set downstream_epochs=1  # a quick check

Each row of the config trains one run (the base options, with `preset` under them, then
the row's own: `mode: dp` with a `target_epsilon`, or `mode: standard`), reused when it has
finished and resumed when it was interrupted. Its final generator (last checkpoint: no
checkpoint is chosen on the real test split) is then evaluated:

- downstream accuracy (`gankit.metrics.downstream.synthetic_to_real`): a CNN trained on
  `train_samples` generated labelled images, its epoch chosen on `val_samples` held-out
  generated images, tested once on the 10,000 real test images;
- classifier-space FID, precision, recall, density and coverage of `metric_samples`
  samples against the real test split;
- the baseline users compare with: a classifier trained directly on the real training
  images with DP-SGD at the row's epsilon (`gankit.privacy.dp_sgd_classifier_accuracy`);
- with `--eval-set class_filter=1`, for rows trained with an auxiliary classifier:
  downstream accuracy, label agreement, FID and recall again on the samples D's own class
  head keeps (`gankit.class_filter`: post-processing of the private D, no privacy cost), with
  the filter's acceptance. Off by default: on the AC-GAN rows G learns to satisfy D's head
  (it accepted 99.9% of the epsilon-1 seed-2 row's samples), so it changed nothing there.

epsilon is reported under RDP (what the papers report) beside PRV, both from the run's own
accountant history. Outputs in --out (default runs/<config name>; committed results change
only when --out names them): table.csv, table.md, metrics_vs_epsilon.png,
samples/<row>.png, generators/<name>/generator.safetensors for the rows in
`release` (row -> name), runs/<row>/.
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from gankit.studies import (command_line, parse_value, read_spec, row_configs, same_training,
                            study_config, study_out, study_parser, train_row, write_csv)
from gankit.data import load_data
from gankit.errors import UserError
from gankit.evaluate import Reference, evaluate_samples, markdown_table, metric_classifier
from gankit.metrics.downstream import balanced_labels, labelled_samples, synthetic_to_real
from gankit.runs import RunDir
from gankit.class_filter import has_class_head, sample_agreeing
from gankit.privacy import dp_sgd_baseline_noise, dp_sgd_classifier_accuracy, epsilon_of
from gankit.sampling import export_generator, load_discriminator, load_generator

log = logging.getLogger("gankit")

# Measured again on the samples D's class head keeps (rows trained with an auxiliary classifier).
FILTERED_COLUMNS = ["downstream_accuracy", "label_agreement", "fid", "recall"]
TABLE_COLUMNS = ["row", "epochs_done", "epsilon", "epsilon_prv", "delta", "downstream_accuracy",
                 "within_class_spread", "label_agreement",
                 "dp_sgd_baseline_accuracy", "fid", "precision", "recall", "density", "coverage",
                 "downstream_epoch", "noise_multiplier", "dp_steps", "d_steps_per_g_step",
                 "g_steps", "seed", "train_time_s", "device", "filter_acceptance",
                 *(f"filtered_{k}" for k in FILTERED_COLUMNS)]
PLOTTED = ["downstream_accuracy", "fid", "precision", "recall"]


def privacy_of(run: RunDir) -> dict:
    """epsilon under RDP and PRV from the run's own accountant history (inf when public)."""

    ckpt = run.load_checkpoint("last")
    mode = ckpt.get("mode") or {}
    if "accountant" not in mode:
        return {"epsilon": math.inf, "epsilon_prv": math.inf, "delta": 0.0,
                "noise_multiplier": 0.0, "dp_steps": 0}
    history, delta = mode["accountant"]["history"], mode["delta"]
    return {"epsilon": epsilon_of(history, delta, "rdp"),
            "epsilon_prv": epsilon_of(history, delta, "prv"), "delta": delta,
            "noise_multiplier": mode["noise_multiplier"],
            "dp_steps": sum(int(entry[2]) for entry in history)}


def evaluate_row(name, run_path: Path, data, classifier, ref, ev: dict, seed: int) -> dict:
    run = RunDir(run_path)
    gen = load_generator(run_path, "last")
    train_x, train_y = labelled_samples(gen, ev["train_samples"], seed + 1)
    val_x, val_y = labelled_samples(gen, ev["val_samples"], seed + 2)
    downstream = synthetic_to_real(train_x, train_y, val_x, val_y, data.ref_x, data.ref_y,
                                   epochs=ev["downstream_epochs"], seed=seed)
    n = ev["metric_samples"]
    metrics, _ = evaluate_samples(ref, classifier, train_x[:n], train_y[:n], downstream_epochs=0,
                                  seed=seed)
    last = run.history()[-1]
    privacy = privacy_of(run)
    row = {"row": name, **privacy, **metrics,
           **{k: v for k, v in downstream.items() if not k.endswith("_curve")},
           "downstream_val_curve": json.dumps([round(a, 4) for a in downstream["downstream_val_curve"]]),
           "downstream_val_loss_curve": json.dumps([float(f"{v:.4g}") for v in downstream["downstream_val_loss_curve"]]),
           "d_steps_per_g_step": last.get("d_steps_per_g_step"), "g_steps": last.get("g_steps"),
           "seed": gen.config.train.seed}
    return row


def filtered_evaluation(run_path: Path, data, classifier, ref, ev: dict, seed: int) -> dict:
    """The same measurements on samples kept by D's own class head (gankit.class_filter:
    post-processing of the private D, no privacy cost): for rows trained with an auxiliary
    classifier, else nothing."""
    D = load_discriminator(run_path, "last")
    if not has_class_head(D):
        return {}
    gen = load_generator(run_path, "last")
    sets = []
    for n, offset in ((ev["train_samples"], 1), (ev["val_samples"], 2)):
        labels = balanced_labels(n, gen.num_classes, seed + offset)  # as labelled_samples draws them
        try:
            sets.append(sample_agreeing(gen, D, labels, seed + offset, progress=True))
        except UserError as err:  # a head that never reads some digit: the row has no filtered numbers
            log.warning("%s: %s", run_path.name, err)
            return {"filter_acceptance": math.nan}
    (train_x, train_y, stats), (val_x, val_y, _) = sets
    downstream = synthetic_to_real(train_x, train_y, val_x, val_y, data.ref_x, data.ref_y,
                                   epochs=ev["downstream_epochs"], seed=seed)
    n = ev["metric_samples"]
    metrics, _ = evaluate_samples(ref, classifier, train_x[:n], train_y[:n], downstream_epochs=0,
                                  seed=seed)
    return {"filter_acceptance": stats.acceptance,
            **{f"filtered_{k}": v for k, v in {**metrics, **downstream}.items()
               if k in FILTERED_COLUMNS}}


def add_baseline(row: dict, data, ev: dict, seed: int, measured: list = ()) -> bool:
    """Add the DP-SGD classifier at the row's epsilon, if the row is private and lacks it. It
    needs only the row's privacy facts, never its generator, so a committed row gets it too.
    A baseline in `measured` (rows with the same seed, delta and evaluation settings) that
    trained with the same noise is the same training, so it is reused: rows' targets (9.993,
    9.998) often give one noise multiplier."""
    if not math.isfinite(row["epsilon"]) or "dp_sgd_baseline_accuracy" in row:
        return False

    def noise(r: dict) -> float:
        if "dp_sgd_baseline_noise" not in r:  # (older rows do not record it)
            r["dp_sgd_baseline_noise"] = dp_sgd_baseline_noise(
                len(data.train_x), r["epsilon"], r["delta"], ev["baseline_epochs"])
        return r["dp_sgd_baseline_noise"]

    sigma = noise(row)
    same = next((r for r in measured if r.get("dp_sgd_baseline_accuracy") is not None
                 and r.get("seed") == seed and r["delta"] == row["delta"] and noise(r) == sigma), None)
    if same is None:
        same = dp_sgd_classifier_accuracy(
            data.train_x, data.train_y, data.ref_x, data.ref_y, target_epsilon=row["epsilon"],
            delta=row["delta"], epochs=ev["baseline_epochs"], accountant="rdp", seed=seed)
        same = {"dp_sgd_baseline_accuracy": same["accuracy"], "dp_sgd_baseline_epsilon": same["epsilon"]}
    else:
        log.info("[%s] the DP-SGD baseline of %s is reused (the same noise and seed)",
                 row.get("row"), same.get("row"))
    row["dp_sgd_baseline_accuracy"] = same["dp_sgd_baseline_accuracy"]
    row["dp_sgd_baseline_epsilon"] = same["dp_sgd_baseline_epsilon"]
    return True


def monotonicity(table: list[dict], curve: dict) -> str:
    """Whether the recipe's curve rises with epsilon within the seeds' noise: for downstream
    accuracy (higher is better) and FID (lower is better), each step between neighbouring
    budgets' means set against the largest spread between seeds of one budget."""
    rows = [r for r in table if r["row"] in curve.get("rows", ())]
    by_eps: dict = {}
    for r in rows:
        by_eps.setdefault(round(r["epsilon"], 1) if math.isfinite(r["epsilon"]) else math.inf, []).append(r)
    if len(by_eps) < 2:
        return ""
    lines = []
    for metric, sign in (("downstream_accuracy", 1), ("fid", -1)):
        spread = max((max(r[metric] for r in rs) - min(r[metric] for r in rs)
                      for rs in by_eps.values()), default=0.0)
        means = [(e, sum(r[metric] for r in rs) / len(rs)) for e, rs in sorted(by_eps.items())]
        worst = min(sign * (b[1] - a[1]) for a, b in zip(means, means[1:]))
        verdict = "monotone" if worst >= 0 else (
            "monotone within the seeds' noise" if -worst <= spread else "NOT monotone")
        path = ", ".join(f"{'inf' if math.isinf(e) else f'{e:g}'}: {m:.4g}" for e, m in means)
        lines.append(f"{metric} by epsilon (mean over seeds) {path}: {verdict} (largest step "
                     f"against the trend {max(0.0, -worst):.4g}; largest spread between seeds "
                     f"{spread:.4g}).")
    return "Curve (" + curve.get("label", "recipe") + "): " + " ".join(lines)


def plot_metrics(path: Path, table: list[dict], curves: list[dict]) -> None:
    """Each metric against epsilon (log x) for each recipe's rows (config "curves"): seeds
    as points and their mean as the line, a recipe's non-private row and the DP-SGD baseline
    as references; the exploratory rows of other recipes as grey points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    curve_rows = {name for c in curves for name in c.get("rows", ())}
    ours = [r for r in table if r["row"] in curve_rows]
    others = [r for r in table if r not in ours and math.isfinite(r["epsilon"])]
    fig, axes = plt.subplots(2, (len(PLOTTED) + 1) // 2, figsize=(10, 7), squeeze=False)
    for ax, metric in zip(axes.flat, PLOTTED):
        if others:
            ax.scatter([r["epsilon"] for r in others], [r[metric] for r in others], s=10,
                       color="0.6", alpha=0.6, label="other recipes (explorations)")
        for k, curve in enumerate(curves):
            color, label = f"C{k}", curve.get("label", "recipe")
            rows = [r for r in table if r["row"] in curve.get("rows", ())]
            private = [r for r in rows if math.isfinite(r["epsilon"])]
            targets = sorted({round(r["epsilon"]) if r["epsilon"] >= 1 else round(r["epsilon"], 1)
                              for r in private})
            by_target = {t: [r for r in private if abs(r["epsilon"] - t) / t < 0.1] for t in targets}
            ax.scatter([r["epsilon"] for r in private], [r[metric] for r in private], s=18,
                       color=color, label=f"{label} (each seed)")
            # The mean over the seeds of each epsilon, at their mean epsilon.
            means = sorted((sum(r["epsilon"] for r in rs) / len(rs), sum(r[metric] for r in rs) / len(rs))
                           for rs in by_target.values() if rs)
            if means:
                ax.plot(*zip(*means), "-", color=color, label=f"{label}: mean over seeds")
            for r in rows:
                if not math.isfinite(r["epsilon"]):
                    ax.axhline(r[metric], color=color, ls=":", lw=1.2, label=f"{label} without DP")
        if metric == "downstream_accuracy":
            base = sorted({(r["epsilon"], r["dp_sgd_baseline_accuracy"]) for r in ours
                           if math.isfinite(r["epsilon"]) and r.get("dp_sgd_baseline_accuracy") is not None})
            if base:
                ax.plot(*zip(*base), "--s", ms=3, color="C3", label="DP-SGD classifier on real")
        ax.set_xscale("log")
        # The budgets the field reports, as plain numbers (log-scale labels of nearby
        # epsilons otherwise print as overlapping mathtext).
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 4, 8, 10, 16]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(0.7, 23)
        ax.set_xlabel("epsilon (RDP, delta 1e-5)")
        ax.set_title(metric + (" (lower is better)" if metric == "fid" else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = study_parser(__doc__.splitlines()[0], study_config("dp_mnist_cpu.json"), seed=False, samples=False, parallel=False)
    parser.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an evaluation setting (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the DP-SGD baseline")
    parser.add_argument("--partial", action="store_true",
                        help="with --evaluate-only: also evaluate unfinished rows at their last "
                             "checkpoint (epsilon is what they spent so far; epochs_done says "
                             "where they stopped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = read_spec(args.config)
    out = study_out(args)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    ev = dict(spec["evaluation"])
    ev.update({k: parse_value(v) for k, v in (s.split("=", 1) for s in args.eval_set)})
    base = {**spec["base"], "device": args.device}
    if args.data_root:
        base["data_root"] = args.data_root
    configs = row_configs(spec, base, args.rows, args.set, out / "runs")
    data = load_data(next(iter(configs.values())).data)
    log.info("data: %s", data.description)
    if len(data.train_x) != 60000:
        log.warning("the papers train on all 60,000 MNIST images; this is %s", data.description)
    classifier = metric_classifier("", data.image_shape, data.num_classes)
    ref = Reference.of(classifier, data.ref_x, data.ref_y)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   # The vector unit too: an epoch took 1.9 times as long on an AVX2-only CPU
                   # as on other 2-core machines, so times compare only alike.
                   else f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})")

    started = time.perf_counter()
    table, grids = [], {}
    # Baselines measured before, for add_baseline to reuse: the committed evaluations' rows.
    earlier_baselines = [e["row"] for e in (json.loads(f.read_text()) for f in sorted((out / "evaluations").glob("*.json")))
                if e["key"]["evaluation"] == ev] if (out / "evaluations").is_dir() else []
    for name, config in configs.items():
        run = RunDir(out / "runs" / name)
        committed = out / "evaluations" / f"{name}.json"
        if args.evaluate_only and not run.checkpoint_path("last").exists() and committed.is_file():
            # A row trained on another machine: its run folder stays out of git, and its
            # committed evaluation (sample grid, history, released generator beside it) is the
            # evidence, if it measured what this table measures.
            cached = json.loads(committed.read_text())
            if cached["key"]["evaluation"] != ev:
                log.warning("[%s] its committed evaluation used other settings; skipped", name)
                continue
            # (Older committed evaluations carry no config to compare.)
            if "config" in cached and not same_training(cached["config"], config):
                log.warning("[%s] its committed evaluation measured another configuration; skipped", name)
                continue
            row = cached["row"]
            if not args.no_baseline and add_baseline(row, data, ev, config.train.seed, earlier_baselines + table):
                committed.write_text(json.dumps(cached, indent=1))
            row["epochs_done"] = f"{cached['key']['checkpoint_epoch']}/{config.train.epochs}"
            table.append(row)
            log.info("[%s] no run folder here; its committed evaluation is tabled", name)
            continue
        if args.evaluate_only:
            state = (run.load_checkpoint("last")["state"] if run.checkpoint_path("last").exists()
                     else {"epoch": 0})
            if state["epoch"] < config.train.epochs and not (args.partial and state["epoch"]):
                log.info("[%s] not trained to its %d epochs yet; skipped", name, config.train.epochs)
                continue
            train_time = state["train_time"]
        else:
            train_time = train_row(name, config, data, out / "runs")
        # An evaluation is kept beside its run (keyed by the settings and the checkpoint), so
        # rows evaluated in parallel processes are tabled together later without redoing them.
        cache = run.path / "paper_evaluation.json"
        last = run.load_checkpoint("last")
        # The baseline is an add-on to an evaluation, not part of what keys it: a row evaluated
        # with --no-baseline gets its baseline later without its generator being re-measured.
        # (Older evaluations carry a "baseline" entry in their key; it is ignored.)
        key = {"evaluation": ev, "checkpoint_epoch": last["state"]["epoch"]}
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        measured = {k: v for k, v in cached.get("key", {}).items() if k != "baseline"} == key
        if measured:
            row = cached["row"]
            log.info("[%s] evaluation reused from %s", name, cache)
        else:
            row = evaluate_row(name, run.path, data, classifier, ref, ev, config.train.seed)
            if ev.get("class_filter"):
                row.update(filtered_evaluation(run.path, data, classifier, ref, ev, config.train.seed))
            row["train_time_s"] = round(train_time, 1)
            row["device"] = device_name
        added = not args.no_baseline and add_baseline(row, data, ev, config.train.seed, earlier_baselines + table)
        if not measured or added:
            cache.write_text(json.dumps({"key": key, "config": last["config"], "row": row}, indent=1))
        row["epochs_done"] = f"{key['checkpoint_epoch']}/{config.train.epochs}"
        # What the committed results keep of a run (its folder, with checkpoints, stays out of git).
        for sub in ("histories", "evaluations"):
            (out / sub).mkdir(exist_ok=True)
        shutil.copy(run.history_path, out / "histories" / f"{name}.jsonl")
        shutil.copy(cache, out / "evaluations" / f"{name}.json")  # its key says what it measured
        gen = load_generator(run.path, "last")
        images, labels = labelled_samples(gen, 100, config.train.seed + 1)
        table.append(row)
        grids[name] = (images, labels)
        if name in spec.get("release", {}):  # row -> folder name under generators/
            export_generator(run.path, out / "generators" / spec["release"][name], force=True)
        log.info("[%s] epsilon=%.3g (prv %.3g) downstream=%.4f fid=%.3g baseline=%s", name,
                 row["epsilon"], row["epsilon_prv"], row["downstream_accuracy"], row["fid"],
                 row.get("dp_sgd_baseline_accuracy"))

    from torchvision.utils import save_image
    for name, (images, labels) in grids.items():
        order = labels.argsort(stable=True)
        save_image(images[order][:100], out / "samples" / f"{name}.png", nrow=10,
                   normalize=True, value_range=(-1, 1))
    write_csv(out / "table.csv", table, TABLE_COLUMNS + ["downstream_val_curve"])
    command = command_line()
    (out / "table.md").write_text(
        f"# Private utility on MNIST: {Path(args.config).stem}\n\n{spec.get('description', '')}\n\n"
        f"Training data: {data.description}. Downstream: a CNN trained on "
        f"{ev['train_samples']:,} generated labelled images for {ev['downstream_epochs']} epochs, "
        f"its epoch chosen on {ev['val_samples']:,} held-out generated images, tested once on "
        f"the {len(data.ref_x):,} real test images. FID, precision, recall, density, coverage: "
        f"{ev['metric_samples']:,} samples vs the real test split, in the shipped classifier's "
        "features (comparable among themselves, not with Inception FIDs). epsilon: RDP (as the "
        "papers), epsilon_prv: PRV, both from each run's accountant history. "
        "within_class_spread: the samples' per-pixel std within a class over the real test "
        "images' (1 = as diverse as real digits, near 0 = one image per class); "
        "label_agreement: how often the shipped classifier reads the label G was asked for. "
        f"dp_sgd_baseline_accuracy: a classifier trained with DP-SGD directly on the real "
        f"training images at the row's epsilon ({ev['baseline_epochs']} epochs). "
        f"Evaluation time {(time.perf_counter() - started) / 60:.1f} min.\n\n"
        + "".join(f"{line}\n\n" for line in (monotonicity(table, c) for c in spec.get("curves", [])) if line)
        + f"Command: `{command}`\n\n" + markdown_table(table, TABLE_COLUMNS))
    plot_metrics(out / "metrics_vs_epsilon.png", table, spec.get("curves", []))
    log.info("wrote %s", out / "table.md")
    return 0

