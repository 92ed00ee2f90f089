"""`gankit study dp-mnist` from a source checkout: the study lives in gankit/dp_mnist.py
(toolkit/dp_mnist.py); its configs here in experiments/configs/ ship with the package."""

import sys

from gankit.dp_mnist import main
from gankit.studies import run_study

if __name__ == "__main__":
    sys.exit(run_study(main))
