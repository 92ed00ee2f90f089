"""Evaluation: generated images -> classifier features -> metrics.

Every distribution metric is computed in the feature space of a metric classifier (the
shipped MNIST classifier by default; see checkpoints/README.md), against the data's
reference split, which training never sees. Two entry points:

- `EvalCallback`: during training, every N epochs, precision, recall, density, coverage
  and FID on a fixed number of samples drawn from fixed latents, appended to the history.
- `evaluate_samples`: everything, for `gankit evaluate` and the experiments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from gankit.config import Config
from gankit.data import ImageData, load_data
from gankit.errors import UserError
from gankit.files import LinkRefused, free_path, make_folder, save_figure, write_text
from gankit.metrics import (classifier_score, fid, kid, mode_coverage, plot_prd, prd, prd_f_beta,
                            prdc, within_class_spread)
from gankit.metrics.classifier import extract, load_classifier
from gankit.metrics.downstream import downstream_accuracy, label_with_classifier
from gankit.rejection_sampling import density_ratio_logit, rejection_sampler_for
from gankit.sampling import LoadedGenerator, check_latent_scale, load_discriminator, load_generator
from gankit.trainer import Callback

log = logging.getLogger(__name__)

def metric_classifier(path: str, image_shape, num_classes: int, device="cpu",
                      required: bool = True):
    """The classifier whose features define the metrics, checked against the data's shape.

    Without an explicit path the shipped MNIST classifier is used when it fits; when it
    does not fit and `required` is False, None (evaluation off) instead of an error.
    """
    classifier = load_classifier(path or None, device=device)
    fits = tuple(classifier.image_shape) == tuple(image_shape) and (
        num_classes in (0, classifier.num_classes))
    if fits:
        return classifier
    message = (f"the metric classifier expects {'x'.join(map(str, classifier.image_shape))} images "
               f"with {classifier.num_classes} classes, the data has "
               f"{'x'.join(map(str, image_shape))} with {num_classes or 'no'} classes; train one "
               "for your data with gankit classifier train and pass --classifier")
    if required or path:
        raise UserError(message)
    log.warning("evaluation off: %s", message)
    return None


@dataclass
class Reference:
    """Classifier features of the real reference split (and, when it is labelled, its
    within-class spread), computed once.

    Stored in a fixed random order (splits may be sorted by class), so that any prefix is
    an unbiased subset.
    """
    images: Tensor
    labels: Optional[Tensor]
    features: Tensor
    logits: Tensor
    spread: Optional[float] = None  # within_class_spread of the real images

    @classmethod
    def of(cls, classifier, images: Tensor, labels: Optional[Tensor]) -> "Reference":
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], None if labels is None else labels[order]
        features, logits = extract(classifier, images)
        spread = None
        if labels is not None and int(torch.bincount(labels).max()) >= 2:  # a class to measure
            spread = within_class_spread(images, labels)
        return cls(images, labels, features, logits, spread)


def core_metrics(ref: Reference, fake_features: Tensor, k: int = 3) -> dict:
    """The metrics tracked during training: cheap enough for every epoch.

    k-NN radii shrink as a set grows, so precision/recall/density/coverage compare sets of
    equal size (Kynkaanniemi et al. 2019 do the same): the larger set is cut to the smaller
    one's size. FID uses every sample.
    """
    n = min(len(ref.features), len(fake_features))
    scores = prdc(ref.features[:n], fake_features[:n], k=k)
    scores["fid"] = fid(ref.features, fake_features)
    return scores


def evaluate_samples(ref: Reference, classifier, images: Tensor, labels: Optional[Tensor],
                     k: int = 3, downstream_epochs: int = 5, seed: int = 0,
                     device="cpu") -> tuple[dict, object]:
    """All metrics of generated images against the reference: (metrics, PRD curve).

    Downstream accuracy trains a fresh classifier on the generated images with their
    conditional labels (or, for an unconditional G, the metric classifier's labels) and
    tests it on the real reference images; 0 epochs skips it.
    """
    features, logits = extract(classifier, images)
    metrics = core_metrics(ref, features, k)
    metrics["kid"], metrics["kid_std"] = kid(ref.features, features, seed=seed)
    metrics["classifier_score"], _ = classifier_score(logits)
    predicted = logits.argmax(1)
    coverage = mode_coverage(predicted, classifier.num_classes)
    metrics["modes_covered"] = coverage["covered"]
    metrics["mode_kl"] = coverage["kl_from_uniform"]
    metrics["mode_tv"] = coverage["tv_to_uniform"]
    # The rarest and the most frequent class among the samples, by the metric classifier.
    metrics["class_share_min"] = min(coverage["fractions"])
    metrics["class_share_max"] = max(coverage["fractions"])
    if labels is not None:
        # How often the metric classifier agrees with the label G was asked for.
        metrics["label_agreement"] = float((predicted.cpu() == labels.cpu()).float().mean())
        if ref.spread:
            # Diversity within a class, relative to the real images' (1 = as diverse; a G
            # that ignores z is near 0, whatever its precision).
            metrics["within_class_spread"] = within_class_spread(images, labels) / ref.spread
    curve = prd(ref.features, features, seed=seed)
    metrics["prd_f8"], metrics["prd_f1_8"] = prd_f_beta(curve)
    if downstream_epochs and ref.labels is not None:
        train_labels = labels if labels is not None else label_with_classifier(classifier, images)
        metrics["downstream_accuracy"] = downstream_accuracy(
            images, train_labels, ref.images, ref.labels, epochs=downstream_epochs, seed=seed,
            device=device)
    return {k: float(v) for k, v in metrics.items()}, curve


def draw_samples(gen, n: int, seed: int = 0, sigma: Optional[float] = None,
                 truncation: Optional[float] = None, drs: bool = False, D=None,
                 drs_target_rate: float = 0.2, drs_burn_in: int = 5000,
                 calibration: Optional[tuple] = None, drs_percentile: Optional[float] = None) -> tuple[Tensor, Optional[Tensor], dict]:
    """n samples of a LoadedGenerator, optionally truncated and/or rejection-sampled.

    `calibration` = (real images, labels): the data a DRS calibration may use; it is only
    used for objectives whose D outputs are not density-ratio logits (wgan, hinge, ...), and
    then `info["drs_uses_real_data"]` says so. Pass training data, never the reference split.
    """
    info = {"sigma": gen.prior.sigma if sigma is None else sigma,
            "truncation": gen.prior.truncation if truncation is None else truncation}
    if not drs:
        images, labels = gen.sample(n, seed, sigma, truncation, progress=True)
        return images, labels, info
    loss = gen.config.objective.loss
    if gen.privacy["private"] and density_ratio_logit(loss) is None:
        # DRS itself only post-processes the private D; a calibration would read the
        # training images outside the privacy accounting.
        raise UserError(f"rejection sampling a '{loss}' discriminator needs a calibration on the "
                        f"training images, which this run's privacy guarantee (it protects "
                        f"{gen.privacy['protects']}) does not cover; DRS is free for bce, js, kl, "
                        "rkl and hellinger")
    real_images, real_labels = calibration if calibration is not None else (None, None)
    # gamma: a percentile of the burn-in scores (the paper's choice) or a target acceptance.
    gamma_choice = ({"gamma_percentile": drs_percentile} if drs_percentile is not None
                    else {"target_acceptance": drs_target_rate})
    sampler = rejection_sampler_for(
        gen, D, loss, real_images=real_images,
        real_labels=real_labels if gen.num_classes else None, sigma=sigma,
        truncation=truncation, seed=seed, burn_in=drs_burn_in, **gamma_choice)
    images, labels, stats = sampler.sample(n)
    info.update({f"drs_{k}": v for k, v in stats.as_dict().items()
                 if k in ("acceptance_rate", "draws", "max_logit", "gamma", "uses_real_data")})
    return images, labels, info


def truncation_sweep(gen, ref: Reference, classifier, sigmas, n: int, seed: int = 0,
                     k: int = 3) -> list[dict]:
    """Precision, recall and FID as the latent scale sigma varies: the truncation trade-off."""
    trajectory = []
    for sigma in sigmas:
        images, _ = gen.sample(n, seed, sigma=sigma)
        features, _ = extract(classifier, images)
        m = core_metrics(ref, features, k)
        trajectory.append({"sigma": sigma, "precision": m["precision"], "recall": m["recall"],
                           "fid": m["fid"]})
    return trajectory


def plot_truncation(trajectories: dict, path) -> None:
    """Precision-recall paths over sigma, one per name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, points in trajectories.items():
        line, = ax.plot([p["recall"] for p in points], [p["precision"] for p in points], "-o",
                        ms=3, label=name)
        for p in points:
            ax.annotate(f"{p['sigma']:g}", (p["recall"], p["precision"]), fontsize=6,
                        color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Truncation sweep (labels: latent scale sigma)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


class EvalCallback(Callback):
    """Precision, recall, density, coverage, FID and the classifier score every `eval_every`
    epochs."""

    def __init__(self, config: Config, data: ImageData, classifier):
        self.config, self.classifier = config, classifier
        self.ref = Reference.of(classifier, data.ref_x, data.ref_y)

    def on_epoch_end(self, trainer, record: dict) -> None:
        e, epochs = self.config.eval, self.config.train.epochs
        if record["epoch"] % e.eval_every and record["epoch"] != epochs:
            return
        gen = LoadedGenerator(trainer.sampling_generator, trainer.prior, self.config,
                              trainer.num_classes, trainer.data.image_shape)
        features = generated_features(gen, self.classifier, self.config)
        record.update(metrics_of_features(features, self.ref, self.config))
        if e.pr_curves:
            writer = trainer.recorder.writer if trainer.recorder is not None else None
            record.update(pr_curve(self.ref, features[0], self.config.train.seed,
                                   trainer.run.path / "prd" / f"epoch_{record['epoch']:03d}.png",
                                   writer, record["epoch"]))


def pr_curve(ref: Reference, features: Tensor, seed: int, path: Path, writer=None, step: int = 0) -> dict:
    """An evaluation's PRD curve (Sajjadi et al. 2018): its F8 and F1/8 for the history, the plot
    at `path` (an epoch's or a round's) and, with a writer, in TensorBoard."""
    curve = prd(ref.features, features, seed=seed)
    make_folder(path.parent)
    plot_prd({path.stem.replace("_", " "): curve}, path)
    if writer is not None:
        import numpy as np
        from PIL import Image  # matplotlib's own dependency

        writer.add_image("prd", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
    f8, f1_8 = prd_f_beta(curve)
    return {"prd_f8": float(f8), "prd_f1_8": float(f1_8)}


def generated_features(gen: LoadedGenerator, classifier, config: Config) -> tuple[Tensor, Tensor]:
    """(features, logits) of `eval_samples` images from fixed latents (seed + 2): seeded apart
    from training, so that epochs (or rounds) compare and the training random stream is
    untouched (resume stays exact)."""
    images, _ = gen.sample(config.eval.eval_samples, seed=config.train.seed + 2)
    return extract(classifier, images)


def metrics_of_features(features: tuple[Tensor, Tensor], ref: Reference, config: Config) -> dict:
    features, logits = features
    metrics = {k: float(v) for k, v in core_metrics(ref, features, config.eval.prdc_k).items()}
    # The classifier's Inception-Score-style score (higher: confident and varied classes).
    metrics["classifier_score"] = float(classifier_score(logits)[0])
    return metrics


def training_classifier(config: Config, data: ImageData, device="cpu"):
    """The metric classifier for evaluation during training, or None when evaluation is off
    or no classifier fits the data."""
    if not config.eval.eval_every:
        return None
    return metric_classifier(config.eval.classifier, data.image_shape, data.num_classes, device,
                             required=False)


def training_callbacks(config: Config, data: ImageData, device="cpu") -> list:
    """The callbacks a training run gets from its config."""
    classifier = training_classifier(config, data, device)
    return [EvalCallback(config, data, classifier)] if classifier is not None else []


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """A markdown table of metric dicts; floats to 4 significant digits."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    fmt = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def evaluate_run(run: str, checkpoint: str = "last", num: int = 10000, seed: int = 0,
                 sigma: Optional[float] = None, truncation: Optional[float] = None, drs: bool = False,
                 drs_target_rate: float = 0.2, drs_percentile: Optional[float] = None,
                 downstream_epochs: int = 5, data_root: str = "", classifier: str = "", k: int = 3,
                 sigmas: str = "", no_ema: bool = False, out: str = "",
                 force: bool = False) -> tuple[dict, Path]:
    """What `gankit evaluate` does (the options are its own): draw `num` samples of a run's
    generator, measure them against the reference split and write metrics.json, metrics.md,
    prd.png and, with `sigmas`, truncation.csv and truncation.png into `out` (default
    <run>/eval/<checkpoint>[-drs]). Returns (the result written to metrics.json, out)."""
    if k < 1 or num <= k or downstream_epochs < 0:
        raise UserError(f"--k must be at least 1 and --num must exceed it (got --k {k}, --num {num}); "
                        "--downstream-epochs must be >= 0")
    check_latent_scale(sigma, truncation)
    try:
        sweep = [float(v) for v in sigmas.split(",")] if sigmas else []
    except ValueError:
        raise UserError(f"--sigmas must be comma-separated numbers, got '{sigmas}'") from None
    if not all(0 < v <= 100 for v in sweep):  # NaN fails this too
        raise UserError("--sigmas must be positive numbers up to 100")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    # Chosen before minutes of sampling: an explicit folder holding files is replaced only
    # with --force; the default never replaces an earlier evaluation.
    if out:
        folder = Path(out)
        if folder.is_symlink():
            raise LinkRefused(f"{folder} is a symbolic link; gankit never writes through links")
        if folder.is_dir() and any(folder.iterdir()) and not force:
            raise UserError(f"{folder} holds an earlier evaluation; pass --force to replace it, "
                            "or choose another --out")
    else:
        folder = free_path(run_dir / "eval" / (checkpoint + ("-drs" if drs else "")))
    start = time.perf_counter()
    gen = load_generator(run, checkpoint, ema=not no_ema)
    data_config = gen.config.data
    if data_root:
        data_config = dataclasses.replace(data_config, data_root=data_root)
    data = load_data(data_config)
    log.info("reference: %s", data.description)
    net = metric_classifier(classifier, data.image_shape, data.num_classes)
    ref = Reference.of(net, data.ref_x, data.ref_y)
    D = load_discriminator(run, checkpoint) if drs else None
    images, labels, info = draw_samples(gen, num, seed, sigma, truncation, drs, D, drs_target_rate,
                                        drs_percentile=drs_percentile,
                                        calibration=(data.train_x, data.train_y))
    metrics, curve = evaluate_samples(ref, net, images, labels, k, downstream_epochs, seed)
    result = {"run": str(run), "checkpoint": checkpoint, "samples": num,
              "reference": data.description, "reference_size": len(data.ref_x), **info,
              "metrics": metrics}
    name = Path(run).name
    if sweep:
        result["truncation_sweep"] = truncation_sweep(gen, ref, net, sweep, num, seed, k)
    result["seconds"] = round(time.perf_counter() - start, 1)
    make_folder(folder)
    write_text(folder / "metrics.json", json.dumps(result, indent=2) + "\n")
    write_text(folder / "metrics.md", markdown_table([{"metric": key, "value": v}
                                                      for key, v in shown_metrics(metrics).items()]))
    plot_prd({name: curve}, folder / "prd.png")
    if sweep:
        trajectory = result["truncation_sweep"]
        write_text(folder / "truncation.csv",
            "sigma,precision,recall,fid\n"
            + "".join(f"{p['sigma']},{p['precision']},{p['recall']},{p['fid']}\n" for p in trajectory))
        plot_truncation({name: trajectory}, folder / "truncation.png")
    return result, folder


def shown_metrics(metrics: dict) -> dict:
    """Metrics as people read them: KID (a squared MMD, about 1e-3 for good samples) is shown
    times 1,000 with its standard deviation over subsets, as papers report it; metrics.json
    keeps the raw values."""
    shown = {key: v for key, v in metrics.items() if key not in ("kid", "kid_std")}
    if "kid" in metrics:
        shown["kid_x1000"] = f"{metrics['kid'] * 1e3:.4g} ± {metrics.get('kid_std', 0.0) * 1e3:.2g}"
    return shown
