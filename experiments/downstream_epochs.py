"""How the downstream classifier's epoch choice reads a generator: every epoch's accuracy and
cross-entropy on held-out generated images beside its accuracy on the real test split.

    python experiments/downstream_epochs.py experiments/results/dp_mnist/generators/eps10 \
        --data-root ../shared/data/mnist --seed 2

dp_mnist.py tests one epoch, the one with the best held-out generated accuracy (the first of
ties). When G's samples are so consistent that this accuracy is 1.0 after the first epoch,
that rule always picks epoch 1, the least-trained classifier; the held-out cross-entropy
still separates the epochs. This prints what each rule would pick and what it would score,
so the rule can be judged; the real test accuracy of every epoch is shown for that study
only (choosing an epoch by it would spend the test split). It writes nothing.
"""

import argparse
import sys

from gankit.config import DataConfig
from gankit.data import load_data
from gankit.errors import UserError
from gankit.metrics.downstream import labelled_samples, synthetic_to_real
from gankit.sampling import load_generator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator", help="a run folder or a released generator's folder")
    parser.add_argument("--data-root", default="../shared/data/mnist",
                        help="where the MNIST IDX files are (the real test split is read)")
    parser.add_argument("--seed", type=int, default=1,
                        help="as dp_mnist.py: the row's training seed (samples use seed+1, seed+2)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--val-samples", type=int, default=10000)
    args = parser.parse_args()
    try:
        gen = load_generator(args.generator, "last")
        if not gen.num_classes:
            raise UserError("downstream accuracy needs a class-conditional generator")
        data = load_data(DataConfig(dataset="mnist", data_root=args.data_root))
        train_x, train_y = labelled_samples(gen, args.train_samples, args.seed + 1)
        val_x, val_y = labelled_samples(gen, args.val_samples, args.seed + 2)
        result = synthetic_to_real(train_x, train_y, val_x, val_y, data.ref_x, data.ref_y,
                                   epochs=args.epochs, seed=args.seed, test_every_epoch=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    val, loss, test = (result[k] for k in ("downstream_val_curve", "downstream_val_loss_curve",
                                           "downstream_test_curve"))
    print("| epoch | held-out generated accuracy | held-out generated cross-entropy | real test accuracy |")
    print("|---|---|---|---|")
    for e, (a, ce, t) in enumerate(zip(val, loss, test), 1):
        print(f"| {e} | {a:.4f} | {ce:.3g} | {t:.4f} |")
    rules = {"best held-out accuracy (dp_mnist.py)": val.index(max(val)),
             "lowest held-out cross-entropy": loss.index(min(loss)),
             "last epoch": len(val) - 1}
    for rule, i in rules.items():
        print(f"{rule}: epoch {i + 1}, real test accuracy {test[i]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
