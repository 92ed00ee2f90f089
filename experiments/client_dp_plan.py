"""Where client-level DP-FedAvg can work: epsilon against signal-to-noise, before any training.

    python experiments/client_dp_plan.py                      # the table, to stdout
    python experiments/client_dp_plan.py --out runs/client_dp_plan.md

For `--client-dp poisson` (server/dp_fedavg.py) with N clients, join probability q, noise
multiplier z, clip C and R rounds, the released mean update carries Gaussian noise of std
z C / (q N) per coordinate, so over a network of d trained weights its norm is about
z C sqrt(d) / (q N), while the signal (the mean of clipped updates) has norm at most C. The
ratio noise/signal = z sqrt(d) / (q N) says whether a round moves the model at all; it only
falls with more clients per round (q N), fewer weights (d: D alone with --sync d, a narrower
D) or less noise, which epsilon limits. Over R rounds of a consistent direction the
noise averages down by about sqrt(R) against the signal, so a per-round ratio of a few is
workable with hundreds of rounds and one of tens is not. Epsilon: RDP of the subsampled
Gaussian (Opacus) after R rounds, delta as the toolkit resolves it for N clients (1e-5, or
1/(10 N) when 1e-5 is not below 1/N).
"""

import argparse
import math
import sys
from pathlib import Path

from gankit.evaluate import markdown_table
from gankit.privacy import client_level_epsilon, resolve_delta

# Trained weights per network (the toolkit's conditional DCGAN on 28x28, 10 classes).
SIZES = {"D w8": 10_857, "D w16": 25_809, "D w32": 68_001, "G+D w32": 531_970}


def plan(clients: int, per_round: float, noise: float, rounds: int) -> dict:
    q = per_round / clients
    delta = resolve_delta(0.0, clients)
    row = {"clients": clients, "per_round": per_round, "q": round(q, 4), "noise": noise, "rounds": rounds,
           "delta": f"{delta:.2g}", "epsilon": client_level_epsilon(noise, rounds, delta, q)}
    for name, d in SIZES.items():
        row[f"noise/signal {name}"] = noise * math.sqrt(d) / per_round
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args()
    rows = [plan(n, m, z, r)
            for n, m in ((100, 10), (100, 30), (100, 100), (600, 60), (1000, 100), (6000, 600))
            for z, r in ((0.7, 100), (1.0, 200), (2.0, 500))]
    text = markdown_table(rows)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Client-level DP-FedAvg: epsilon against noise/signal\n\n"
                                  + __doc__.split("\n\n", 2)[2] + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
