"""Downstream usefulness of generated data: train on synthetic, test on real.

A fresh classifier of the metric classifier's architecture is trained on generated,
labelled images and tested on real held-out images (the score reported by e.g. DP-GAN and
GS-WGAN). Unconditional generators have no labels; `label_with_classifier` gives their
images the metric classifier's predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gankit.errors import UserError
from gankit.metrics.classifier import (Classifier, accuracy, accuracy_and_cross_entropy,
                                      predict, recalibrate_batchnorm, train_classifier)


def downstream_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                        epochs: int = 5, seed: int = 0, device: str = "cpu",
                        batch_size: int = 128, augment: bool = False,
                        progress: bool = False) -> float:
    """Accuracy on (test_x, test_y) of a classifier trained from scratch on (train_x, train_y).

    No augmentation by default: the score should measure the generated data, not what
    augmentation adds to it. The class count covers the labels of both sets, so a
    generator that never produces some class is scored on it (and gets it wrong).
    """
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise UserError(f"training images {tuple(train_x.shape[1:])} and test images "
                        f"{tuple(test_x.shape[1:])} differ in shape")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError("every image needs one label")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    classifier = train_classifier(train_x, train_y, epochs=epochs, batch_size=batch_size,
                                  augment=augment, seed=seed, device=device, progress=progress,
                                  num_classes=max(num_classes, 2))
    return accuracy(classifier, test_x, test_y)


def label_with_classifier(classifier: Classifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """The metric classifier's predicted class (argmax of its logits) of every image, int64."""
    return predict(classifier, images, batch_size)


def synthetic_to_real(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                      test_x: Tensor, test_y: Tensor, epochs: int = 10, seed: int = 0,
                      device: str = "cpu", batch_size: int = 128, progress: bool = False,
                      test_every_epoch: bool = False) -> dict:
    """Downstream accuracy as the DP-generation papers measure it.

    A fresh classifier is trained on generated labelled images (train_x, train_y); after
    every epoch its accuracy on held-out *generated* images (val_x, val_y) is measured, and
    the epoch with the best one is tested once on the real test images. Choosing the epoch
    on the real test split would inflate the score and spend the test set (DPImageBench's
    main finding; Bie et al. 2023 choose on 5,000 held-out synthetic images).

    Returns the test accuracy, the chosen epoch and every epoch's validation accuracy and
    cross-entropy. test_every_epoch adds every epoch's test accuracy, for studying the
    selection rule itself (experiments/downstream_epochs.py), never for choosing an epoch.
    """
    import copy

    for x, y, what in ((train_x, train_y, "training"), (val_x, val_y, "validation"),
                       (test_x, test_y, "test")):
        if len(x) != len(y) or len(x) == 0:
            raise UserError(f"the {what} images need one label each, and at least one image")
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise UserError(f"training images {tuple(train_x.shape[1:])} and test images "
                        f"{tuple(test_x.shape[1:])} differ in shape")
    num_classes = max(int(max(train_y.max(), test_y.max(), val_y.max())) + 1, 2)
    calibration = train_x[:5000].to(device)
    best = {"accuracy": -1.0, "epoch": 0, "state": None}
    val_curve, val_loss_curve, test_curve = [], [], []

    def select(epoch: int, model: Classifier) -> None:
        candidate = copy.deepcopy(model)
        recalibrate_batchnorm(candidate, calibration, batch_size)
        acc, loss = accuracy_and_cross_entropy(candidate.eval(), val_x, val_y)
        val_curve.append(acc)
        val_loss_curve.append(loss)
        if test_every_epoch:
            test_curve.append(accuracy(candidate, test_x, test_y))
        if acc > best["accuracy"]:
            best.update(accuracy=acc, epoch=epoch, state=candidate.state_dict())

    model = train_classifier(train_x, train_y, epochs=epochs, batch_size=batch_size,
                             augment=False, seed=seed, device=device, progress=progress,
                             num_classes=num_classes, epoch_end=select)
    model.load_state_dict(best["state"])
    return {"downstream_accuracy": accuracy(model.eval(), test_x, test_y),
            "downstream_epoch": best["epoch"], "downstream_val_accuracy": best["accuracy"],
            "downstream_val_curve": val_curve, "downstream_val_loss_curve": val_loss_curve,
            **({"downstream_test_curve": test_curve} if test_every_epoch else {})}


def balanced_labels(n: int, num_classes: int, seed: int) -> Tensor:
    """n labels, each class equally often, in a seeded order (as the papers label their
    synthetic sets)."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def labelled_samples(gen, n: int, seed: int) -> tuple:
    """n images with balanced labels."""
    return gen.sample(n, seed=seed, labels=balanced_labels(n, gen.num_classes, seed), progress=True)
