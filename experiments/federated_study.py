"""`gankit study federated` from a source checkout: the study lives in gankit/federated_study.py
(toolkit/federated_study.py); its configs here in experiments/configs/ ship with the package."""

import sys

from gankit.federated_study import main
from gankit.studies import run_study

if __name__ == "__main__":
    sys.exit(run_study(main))
