"""Speed and memory of the evaluation metrics.

    python benchmarks/metrics.py               # 10,000 generated vs 10,000 real images
    python benchmarks/metrics.py --memory-n 50000

Times, for N generated vs N real MNIST-shaped images: classifier feature extraction of
both sets, precision/recall/density/coverage, FID, KID, the classifier score, PRD and the
mode coverage: everything `gankit evaluate` computes except downstream accuracy. Goal:
at most 30 s on 2 CPU cores. Then, in a fresh process, the peak memory that prdc adds for
M vs M 128-d features (goal: under 2 GB for 50,000 vs 50,000).

Real images are MNIST (the test split from --data-root when there, else mnist-5k repeated);
generated ones come from an untrained DCGAN: the metrics' cost does not depend on quality.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Peak resident memory during prdc minus the resident memory just before it, sampled every
# 5 ms (the process's lifetime maximum would be the imports', not prdc's).
MEMORY_PROBE = """
import sys, threading, time, torch
from gankit.metrics import prdc
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
n = {n}
real, fake = torch.randn(n, 128), torch.randn(n, 128) + 0.1
before, peak, done = rss_mb(), [0.0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
watcher = threading.Thread(target=watch)
watcher.start()
prdc(real, fake)
done.set()
watcher.join()
print(peak[0] - before)
"""


def main() -> None:
    import torch

    from gankit.config import Config, DataConfig
    from gankit.data import load_data
    from gankit.evaluate import Reference, evaluate_samples
    from gankit.metrics.classifier import load_classifier
    from gankit.models import build_generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--memory-n", type=int, default=50_000)
    args = parser.parse_args()

    data = load_data(DataConfig(dataset="mnist-5k", data_root=args.data_root))
    real = data.ref_x if len(data.ref_x) >= args.n else data.train_x.repeat(
        args.n // len(data.train_x) + 1, 1, 1, 1)
    real, labels = real[: args.n], None
    cfg = Config()
    torch.manual_seed(0)
    G = build_generator(cfg.model, cfg.latent.latent_dim, (1, 28, 28), 0).eval()
    with torch.no_grad():
        fake = torch.cat([G(torch.randn(500, cfg.latent.latent_dim)) for _ in range(args.n // 500)])
    classifier = load_classifier()
    print(f"{args.n:,} generated vs {len(real):,} real images, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    ref = Reference.of(classifier, real, labels)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    metrics, _ = evaluate_samples(ref, classifier, fake, None, downstream_epochs=0)
    t_metrics = time.perf_counter() - start
    total = t_ref + t_metrics
    print(f"  real features            {t_ref:6.1f} s")
    print(f"  fake features + metrics  {t_metrics:6.1f} s  ({', '.join(sorted(metrics))})")
    print(f"  total                    {total:6.1f} s  = {total / 30:.2f} of the 30 s goal")

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(n=args.memory_n)],
                         capture_output=True, text=True, check=True)
    added_mb = float(out.stdout.strip())
    print(f"\nprdc on {args.memory_n:,} vs {args.memory_n:,} 128-d features: peak memory "
          f"+{added_mb:.0f} MB = {added_mb / 2048:.2f} of the 2 GB goal")


if __name__ == "__main__":
    main()
