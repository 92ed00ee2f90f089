"""`gankit study dp-sweep` from a source checkout: the study lives in gankit/dp_sweep.py
(toolkit/dp_sweep.py); its configs here in experiments/configs/ ship with the package."""

import sys

from gankit.dp_sweep import main
from gankit.studies import run_study

if __name__ == "__main__":
    sys.exit(run_study(main))
