"""Engine speed: analysis of a Linear(256, n) layer feeding a small consumer, n = 1k ... 64k.

Each measurement runs in a fresh subprocess (so its peak RSS is its own). Side by side in the same run:
`exact`, `cosine` (the engine, t = 0.7) and the study's path (full cosine distance matrix + scipy average
linkage), which is skipped where its distance matrix cannot fit in memory. The layer has planted fibers
(n/4 distinct rows, each copied 4 times with relative noise 1e-6).

    python benchmarks/engine.py [--sizes 1024 4096 16384 65536] [--repeats 3] [--out benchmarks/results/engine.json]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STUDY_LIMIT = 16384  # n(n-1)/2 float64 distances: 65,536 units would need 17 GiB before linkage copies them


def layer(n: int):
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n // 4, 257, generator=generator, dtype=torch.float64)
    rows = base.repeat_interleave(4, dim=0)[torch.randperm(n, generator=generator)]
    rows = rows * (1 + 1e-6 * torch.randn(rows.shape, generator=generator, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(256, n), nn.ReLU(), nn.Linear(n, 8))
    with torch.no_grad():
        model[0].weight.copy_(rows[:, :256])
        model[0].bias.copy_(rows[:, 256])
    return model, rows


def measure(method: str, n: int) -> dict:
    import numpy as np
    import torch
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    import metta_collapse as mc

    model, rows = layer(n)
    start = time.perf_counter()
    if method == "study":
        distances = np.clip(pdist(rows.float().double().numpy(), "cosine"), 0.0, 2.0)
        width = int(fcluster(linkage(distances, "average"), 0.7, "distance").max())
    else:
        config = mc.CollapseConfig(metric=method, thresholds=mc.Thresholds(linear=0.7))
        width = mc.analyze(model, torch.randn(4, 256), config).layers[0].width_after
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"method": method, "n": n, "seconds": seconds, "peak_rss_gib": peak_gib, "width_after": width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=3, help="runs per (method, size) up to 16k; 1 above")
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    results = []
    print(f"{'n':>6} {'method':>7} {'median s':>9} {'peak GiB':>9} {'width':>6}")
    for n in args.sizes:
        for method in ("exact", "cosine", "study"):
            if method == "study" and n > STUDY_LIMIT:
                print(
                    f"{n:>6} {method:>7}  does not fit in 24 GiB "
                    f"(condensed distances alone {n * (n - 1) * 4 / 2**30:.0f} GiB)"
                )
                continue
            runs = []
            for _ in range(args.repeats if n <= STUDY_LIMIT else 1):
                child = subprocess.run(
                    [sys.executable, __file__, "--one", method, str(n)], capture_output=True, text=True
                )
                if child.returncode != 0:
                    raise SystemExit(f"{method} at n={n} failed:\n{child.stderr[-2000:]}")
                runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            row = {
                "method": method,
                "n": n,
                "median_seconds": statistics.median(r["seconds"] for r in runs),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
                "width_after": runs[0]["width_after"],
                "runs": [r["seconds"] for r in runs],
            }
            results.append(row)
            print(
                f"{n:>6} {method:>7} {row['median_seconds']:>9.2f} {row['peak_rss_gib']:>9.2f} {row['width_after']:>6}"
            )
    for n in args.sizes:
        by = {r["method"]: r for r in results if r["n"] == n}
        if "study" in by:
            print(
                f"n={n}: cosine / study time ratio {by['cosine']['median_seconds'] / by['study']['median_seconds']:.2f}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threshold": 0.7, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
