"""The objective study: every GAN objective on the same data, model and budget.

    gankit study objective                                   # small, 2 CPU cores
    gankit study objective --config experiments/configs/objective_study_full.json \
        --data-root ../shared/data/mnist --device cuda                      # full, a GPU

Each row of the config trains one run (same seed, data and base options; the row's own
options on top; with a top-level "g_steps", each row's epochs give it that many generator
steps, so WGAN's 5 D steps per G step train 5 times the epochs), then evaluates it three
ways against the real reference split:
plain samples, discriminator rejection sampling (DRS), and a truncation sweep over the
latent scale sigma. Outputs in --out (default runs/<config name>/; pass --out experiments/results/<config name> to update
the committed results):

    table.csv, table.md        precision, recall, F1, density, coverage, FID, downstream
                               accuracy, modes covered, train time; one row per run x DRS
    truncation.csv             precision/recall/FID per run and sigma
    pr_scatter.png             precision vs recall, arrows from plain to DRS samples
    truncation.png             precision-recall trajectories over sigma
    samples/<row>.png          a sample grid per row; samples.png all rows side by side
    evaluations/<row>.json     what each row measured, keyed by its config and the settings
    histories/<row>.jsonl      each row's training history
    runs/<row>/                the training runs (a finished run is reused, not retrained)

A row whose evaluation is committed is tabled from it and never trained again, so a study
can land a few rows at a time, on different machines; --evaluate-only tables what exists.
"""

import logging
import shutil
import time
from pathlib import Path

import torch
from torchvision.io import read_image
from torchvision.utils import save_image

from gankit.errors import UserError
from gankit.evaluate import (Reference, draw_samples, evaluate_samples, markdown_table,
                              metric_classifier, plot_truncation, truncation_sweep)
from gankit.runs import RunDir
from gankit.sampling import load_discriminator, load_generator
from gankit.studies import (command_line, equal_generator_steps, land_rows, read_spec,
                            study_config, study_out, study_parser, study_rows, write_csv)

log = logging.getLogger("gankit")

TABLE_COLUMNS = ["row", "drs", "precision", "recall", "f1", "density", "coverage", "fid",
                 "downstream_accuracy", "modes_covered", "mode_tv", "drs_acceptance_rate",
                 "train_time_s"]


def evaluate_row(name, run_path, ref, classifier, data, ev, seed):
    """Rows of the table (plain and DRS) and the truncation trajectory of one run."""
    gen = load_generator(run_path)
    D = load_discriminator(run_path)
    rows = []
    for drs in (False, True):
        try:
            images, labels, info = draw_samples(gen, ev["samples"], seed, drs=drs, D=D,
                                                drs_target_rate=ev["drs_acceptance"],
                                                calibration=(data.train_x, data.train_y))
        except UserError as err:  # e.g. acceptance too low: report, keep going
            log.warning("[%s] DRS failed: %s", name, err)
            continue
        metrics, _ = evaluate_samples(ref, classifier, images, labels,
                                      downstream_epochs=ev["downstream_epochs"], seed=seed)
        rows.append({"row": name, "drs": "yes" if drs else "no", **metrics,
                     "drs_acceptance_rate": info.get("drs_acceptance_rate", 1.0),
                     "drs_uses_real_data": info.get("drs_uses_real_data", False)})
        if not drs:
            grid_images = images[:64]
    trajectory = [{"row": name, **point} for point in
                  truncation_sweep(gen, ref, classifier, ev["truncation_sigmas"], ev["samples"], seed)]
    return rows, trajectory, grid_images


def plot_results(out: Path, table: list[dict], trajectories: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["row"] for r in table))
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7, 6))
    for name in names:
        plain = next((r for r in table if r["row"] == name and r["drs"] == "no"), None)
        drs = next((r for r in table if r["row"] == name and r["drs"] == "yes"), None)
        if plain:
            ax.scatter(plain["recall"], plain["precision"], color=colors[name], label=name, s=40)
        if plain and drs:
            ax.annotate("", (drs["recall"], drs["precision"]), (plain["recall"], plain["precision"]),
                        arrowprops=dict(arrowstyle="->", color=colors[name], lw=1))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision vs recall (arrows: with rejection sampling)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pr_scatter.png", dpi=120)
    plt.close(fig)

    plot_truncation({name: [t for t in trajectories if t["row"] == name] for name in names},
                    out / "truncation.png")


def seed_answers(table: list[dict], conditional: frozenset = frozenset()) -> list[str]:
    """The study's three questions answered from its own table (markdown bullets), each
    from the rows it needs, or said to wait for them. One seed: a difference of a point or
    two in precision or recall is within what another seed could move. `conditional` names
    the class-conditional rows: they are given each sample's label and draw the classes
    evenly, which features from a digit classifier reward, so the question of the best
    objective is also answered among the unconditional rows alone."""
    entry = {(r["row"], r["drs"]): r for r in table}
    plain = lambda name: entry.get((name, "no"))  # noqa: E731
    answers = []

    bce, kl, rkl = plain("bce"), plain("kl"), plain("rkl")
    if bce and kl and rkl:
        recall_gain, precision_gain = kl["recall"] - bce["recall"], rkl["precision"] - bce["precision"]
        answers.append(
            f"- **Does KL raise recall and reverse KL precision?** Against bce (recall "
            f"{bce['recall']:.3f}, precision {bce['precision']:.3f}): KL's recall is "
            f"{kl['recall']:.3f} ({recall_gain:+.3f}, {'higher' if recall_gain > 0 else 'not higher'}), "
            f"reverse KL's precision {rkl['precision']:.3f} ({precision_gain:+.3f}, "
            f"{'higher' if precision_gain > 0 else 'not higher'}). Between the two: KL recall "
            f"{kl['recall']:.3f} vs reverse KL {rkl['recall']:.3f}; precision {kl['precision']:.3f} "
            f"vs {rkl['precision']:.3f}.")
    else:
        answers.append("- **Does KL raise recall and reverse KL precision?** Needs the bce, kl and rkl rows.")

    pairs = [(name, entry[(name, "no")], entry[(name, "yes")]) for name, drs in entry
             if drs == "yes" and (name, "no") in entry]
    if pairs:
        lower_fid = [name for name, no, yes in pairs if yes["fid"] < no["fid"]]
        higher_precision = [name for name, no, yes in pairs if yes["precision"] > no["precision"]]
        changes = ", ".join(f"{name} {no['fid']:.1f} -> {yes['fid']:.1f}" for name, no, yes in pairs)
        named = lambda names: f" ({', '.join(names)})" if names else ""  # noqa: E731
        answers.append(
            f"- **Does DRS help?** It lowers FID for {len(lower_fid)} of {len(pairs)} rows"
            f"{named(lower_fid)} and raises precision for {len(higher_precision)} of {len(pairs)}"
            f"{named(higher_precision)}. FID per row, plain -> DRS: {changes}.")

    label = lambda r: r["row"] + (" + DRS" if r["drs"] == "yes" else "")  # noqa: E731
    gp = entry.get(("wgan-gp", "yes"))

    def best_of(entries: list[dict]) -> str:
        ranked = sorted(entries, key=lambda r: r["fid"])
        best, by_f1 = ranked[0], max(entries, key=lambda r: r["f1"])
        where = (f"wgan-gp + DRS is number {ranked.index(gp) + 1} of {len(ranked)} at FID {gp['fid']:.1f}"
                 if gp else "the wgan-gp + DRS row is not measured yet")
        return (f"by FID the best entry is {label(best)} ({best['fid']:.1f}); {where}. By F1 of "
                f"precision and recall the best is {label(by_f1)} ({by_f1['f1']:.3f})")

    if table:
        overall = best_of(table)
        answer = f"- **Is WGAN-GP + DRS best?** {overall[0].upper()}{overall[1:]}."
        left_out = sorted(conditional & {r["row"] for r in table})
        unconditional = [r for r in table if r["row"] not in conditional]
        if left_out and unconditional:
            answer += (f" Among the unconditional rows (leaving out {', '.join(left_out)}, "
                       f"{'which is' if len(left_out) == 1 else 'which are'} given each sample's "
                       f"label): {best_of(unconditional)}.")
        answers.append(answer)
    return answers


def main(argv=None) -> int:
    parser = study_parser(__doc__.splitlines()[0], study_config("objective_study_small.json"), samples=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = read_spec(args.config)
    ev = spec["evaluation"]
    out = study_out(args)
    for sub in ("samples", "histories"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    configs, wanted, data = study_rows(spec, args, out)
    if "g_steps" in spec:  # equal generator steps rather than equal epochs
        configs = equal_generator_steps(configs, len(data.train_x), int(spec["g_steps"]))
        log.info("epochs per row for %d G steps: %s", spec["g_steps"],
                 ", ".join(f"{n} {c.train.epochs}" for n, c in configs.items()))
    classifier = metric_classifier("", data.image_shape, data.num_classes)
    ref = Reference.of(classifier, data.ref_x, data.ref_y)

    def evaluate(name: str, run: RunDir) -> dict:
        rows, trajectory, grid = evaluate_row(name, run.path, ref, classifier, data, ev, args.seed)
        shutil.copy(run.history_path, out / "histories" / f"{name}.jsonl")
        save_image(grid, out / "samples" / f"{name}.png", nrow=8, normalize=True,
                   value_range=(-1, 1), pad_value=1)
        return {"rows": rows, "trajectory": trajectory}

    conditional = frozenset(name for name, config in configs.items() if config.model.conditional)
    started = time.perf_counter()
    measured, pending = land_rows(configs, wanted, out, ev, data, args, evaluate)
    table, trajectories = [], []
    for name, saved in measured.items():
        table += [{**r, "train_time_s": saved["train_time_s"]} for r in saved["rows"]]
        trajectories += saved["trajectory"]
        log.info("[%s] %s", name, " ".join(f"{k}={r.get(k, float('nan')):.3g}" for r in saved["rows"]
                                              for k in ("precision", "recall", "fid")))
    if not table:
        log.info("no row is finished yet; no table written")
        return 0

    # All rows' grids side by side, in table order, from the per-row files.
    tabled = list(dict.fromkeys(r["row"] for r in table))
    # Rows measured before the study kept a grid per row have none (their numbers only).
    grids = [out / "samples" / f"{name}.png" for name in tabled if (out / "samples" / f"{name}.png").is_file()]
    tiles = [read_image(str(grid)).float() / 255 for grid in grids]
    if tiles:
        save_image(torch.stack(tiles), out / "samples.png", nrow=4, padding=8, pad_value=1)

    write_csv(out / "table.csv", table, TABLE_COLUMNS)
    write_csv(out / "truncation.csv", trajectories, ["row", "sigma", "precision", "recall", "fid"])
    total = time.perf_counter() - started
    command = command_line()
    (out / "table.md").write_text(
        f"# Objective study: {Path(args.config).stem}\n\n{spec.get('description', '')}\n\n"
        f"Reference: {data.description} ({len(data.ref_x):,} images). "
        f"{ev['samples']:,} generated samples per row; DRS at a target acceptance "
        f"of {ev['drs_acceptance']:.0%}. This call: {total / 60:.1f} min "
        "(train_time_s is each row's own training time, wherever it ran).\n\n"
        + (f"Rows not yet measured: {', '.join(pending)}.\n\n" if pending else "")
        + f"Command: `{command}`\n\n" + markdown_table(table, TABLE_COLUMNS)
        + "\nRows whose objective gives no density-ratio logit (wgan, wgan-gp, hinge, lsgan, "
          "pearson) calibrate D for DRS on the training images.\n\n"
        "## The seed questions\n\n" + "\n".join(seed_answers(table, conditional)) + "\n\n"
        "## Truncation sweep\n\n" + markdown_table(trajectories))
    plot_results(out, table, trajectories)
    log.info("wrote %s (%.1f min)", out / "table.md", total / 60)
    return 0

