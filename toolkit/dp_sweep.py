"""The privacy-budget sweep: one model and seed at several epsilons, evaluated and audited.

    gankit study dp-sweep                                          # small, 2 CPU cores
    gankit study dp-sweep --config experiments/configs/dp_sweep_full.json \
        --data-root ../shared/data/mnist --device cuda                      # full, a GPU
    gankit study dp-sweep --rows eps4,non-private --set epochs=1 --set g_width=8 \
        --set d_width=8 --samples 200 --out /tmp/dp_tiny                    # a quick check

Each row of the config trains one run (same seed, data and base options; the row's own
options on top: `mode: dp` with a `target_epsilon`, or the non-private `mode: standard`),
then evaluates its samples against the real reference split and audits its discriminator
with a membership-inference attack (toolkit/audit.py: D's scores of training images vs
held-out reference images, ROC AUC; 0.5 = chance). Outputs in --out (default
runs/<config name>/; pass --out experiments/results/<config name> to update the
committed results):

    table.csv, table.md        epsilon (the final epsilon the run's history reports; inf when
                               non-private), delta, noise multiplier, dp steps, precision,
                               recall, density, coverage, FID, downstream accuracy, attack AUC,
                               train time
    metrics_vs_epsilon.png     each metric against epsilon (log x); non-private as a line
    samples/<row>.png          a sample grid per row
    evaluations/<row>.json     what each row measured, keyed by its config and the settings
    runs/<row>/                the training runs (a finished run is reused, not retrained)

--rows chooses what trains; the table keeps every row that is measured. A row whose
evaluation is committed is tabled from it and never trained again, so a sweep can land a
few rows at a time, on different machines; --evaluate-only tables what exists.
"""

import logging
import math
import time
from pathlib import Path

from torchvision.utils import save_image

from gankit.audit import audit_discriminator
from gankit.evaluate import (Reference, draw_samples, evaluate_samples, markdown_table,
                              metric_classifier)
from gankit.sampling import load_discriminator, load_generator
from gankit.studies import (command_line, land_rows, read_spec, study_config, study_out, study_parser,
                            study_rows, write_csv)
from gankit.runs import RunDir

log = logging.getLogger("gankit")

TABLE_COLUMNS = ["row", "epsilon", "epsilon_prv", "accountant", "delta", "noise_multiplier", "dp_steps", "precision", "recall",
                 "density", "coverage", "fid", "downstream_accuracy", "attack_auc", "train_time_s"]
PLOTTED = ["precision", "recall", "density", "coverage", "fid", "downstream_accuracy", "attack_auc"]


def privacy_of(run_path: Path) -> dict:
    """The final epoch's privacy record; epsilon inf for a non-private run."""
    history = RunDir(run_path).history()
    last = history[-1] if history else {}
    if "epsilon" not in last:
        return {"epsilon": math.inf, "epsilon_prv": math.inf, "accountant": "", "delta": 0.0,
                "noise_multiplier": 0.0, "dp_steps": 0}
    # The run's own accountant's epsilon, and PRV's for the same steps beside it (the papers
    # report RDP, which reads 8-11% above PRV at the same noise).
    # (Runs trained before the toolkit recorded both have neither.)
    return {"epsilon": float(last["epsilon"]), "epsilon_prv": float(last.get("epsilon_prv", math.nan)),
            "accountant": last.get("accountant", ""), "delta": float(last["delta"]),
            "noise_multiplier": float(last["noise_multiplier"]), "dp_steps": int(last["dp_steps"])}


def evaluate_row(name, run_path, ref, classifier, data, ev, seed):
    """The table row of one run (metrics, privacy, attack AUC) and its sample grid."""
    gen = load_generator(run_path)
    images, labels, _ = draw_samples(gen, ev["samples"], seed)
    metrics, _ = evaluate_samples(ref, classifier, images, labels,
                                  downstream_epochs=ev["downstream_epochs"], seed=seed)
    # The audit attacks D with training images vs the reference split; it is an
    # evaluation of the finished run, not part of training.
    audit = audit_discriminator(load_discriminator(run_path), (data.train_x, data.train_y),
                                (data.ref_x, data.ref_y), n=ev.get("audit_samples") or None, seed=seed)
    row = {"row": name, **privacy_of(run_path), **metrics, "attack_auc": audit["auc"],
           "audit_n": audit["n_members"]}
    return row, images[:64]


def plot_metrics(path: Path, table: list[dict]) -> None:
    """One panel per metric against epsilon; non-private runs as labelled horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted((r for r in table if math.isfinite(r["epsilon"])), key=lambda r: r["epsilon"])
    public = [r for r in table if not math.isfinite(r["epsilon"])]
    metrics = [m for m in PLOTTED if any(m in r for r in table)]
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        pts = [(r["epsilon"], r[metric]) for r in private if metric in r]
        if pts:
            ax.plot(*zip(*pts), "-o", ms=4, color="C0", label="dp")
            ax.set_xscale("log")
        for i, r in enumerate(public):
            if metric in r:
                ax.axhline(r[metric], color=f"C{i + 1}", ls="--", lw=1, label=f"{r['row']} (eps=inf)")
        if metric == "attack_auc":
            ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
        ax.set_title(metric + (" (lower is better)" if metric == "fid" else ""), fontsize=9)
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if "attack_auc" in metrics:
        axes.flat[metrics.index("attack_auc")].legend(fontsize=7)
    fig.suptitle("Quality and membership-attack AUC vs privacy budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = study_parser(__doc__.splitlines()[0], study_config("dp_sweep_small.json")).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = read_spec(args.config)
    out = study_out(args)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    ev = dict(spec["evaluation"])
    if args.samples:
        ev["samples"] = args.samples
    configs, wanted, data = study_rows(spec, args, out)
    classifier = metric_classifier("", data.image_shape, data.num_classes)
    ref = Reference.of(classifier, data.ref_x, data.ref_y)

    def evaluate(name: str, run: RunDir) -> dict:
        row, grid = evaluate_row(name, run.path, ref, classifier, data, ev, args.seed)
        save_image(grid, out / "samples" / f"{name}.png", nrow=8, normalize=True, value_range=(-1, 1))
        return {"row": row}

    started = time.perf_counter()
    measured, pending = land_rows(configs, wanted, out, ev, data, args, evaluate)
    table = []
    for name, saved in measured.items():
        row = {**saved["row"], "train_time_s": saved["train_time_s"]}
        table.append(row)
        log.info("[%s] epsilon=%.3g fid=%.3g downstream=%.3g attack_auc=%.3f", name,
                 row["epsilon"], row["fid"], row.get("downstream_accuracy", float("nan")),
                 row["attack_auc"])
    if not table:
        log.info("no row is finished yet; no table written")
        return 0

    write_csv(out / "table.csv", table, TABLE_COLUMNS)
    total = time.perf_counter() - started
    command = command_line()
    audit_n = table[0]["audit_n"]
    (out / "table.md").write_text(
        f"# Privacy-budget sweep: {Path(args.config).stem}\n\n{spec.get('description', '')}\n\n"
        f"Reference: {data.description} ({len(data.ref_x):,} images). "
        f"{ev['samples']:,} generated samples per row. epsilon is the final epsilon each run's "
        f"history reports under its accountant, epsilon_prv the same steps under PRV "
        f"(inf: non-private). attack_auc: membership inference on D (Hayes et "
        f"al. 2019), {audit_n:,} training vs {audit_n:,} reference images, 0.5 = chance. "
        f"This call: {total / 60:.1f} min (train_time_s is each row's own training time, "
        "wherever it ran).\n\n"
        + (f"Rows not yet measured: {', '.join(pending)}.\n\n" if pending else "")
        + f"Command: `{command}`\n\n" + markdown_table(table, TABLE_COLUMNS))
    plot_metrics(out / "metrics_vs_epsilon.png", table)
    log.info("wrote %s (%.1f min)", out / "table.md", total / 60)
    return 0

