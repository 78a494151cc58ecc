"""Agent steps per second of the small arena's training in 1 process and in N (torchrun, gloo on CPU).

Each process trains its own environment copies (the recipe's 4, 24 agents) and 1/N of the same global batch, so N
processes step N times the agents. Runs alternate (1, N, 1, N, ...) so that both see the same machine; the SPS of
a run is the median over its epochs after the first (`overview/sps`, all processes' steps together). Prints the
medians and their ratio and writes them as JSON. No bar: on 2 CPU cores the processes share the cores.

    python benchmarks/distributed.py [--processes 2] [--epochs 6] [--repeats 2]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # this checkout, even beside an installed copy

from metta_collapse.training.metrics import read_metrics  # noqa: E402

RECIPE = "experiments.recipes.arena_basic_easy_shaped.small"
BATCH = 12288  # the small recipe's


def sps(processes: int, epochs: int, train_dir: str, run: str) -> float:
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [] if processes == 1 else [f"--nproc-per-node={processes}"]
    command = [*launch, str(REPO / "tools" / "run.py"), RECIPE, f"run={run}", f"train_dir={train_dir}"]
    command += ["wandb.enabled=false", f"trainer.total_timesteps={epochs * BATCH}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = read_metrics(Path(train_dir) / run / "metrics.jsonl")
    return statistics.median(m["overview/sps"] for m in metrics[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distributed.json")
    args = parser.parse_args()
    runs: dict[int, list[float]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as train_dir:
        for repeat in range(args.repeats):
            for processes in runs:
                runs[processes].append(sps(processes, args.epochs, train_dir, f"p{processes}_{repeat}"))
                print(f"{processes} process(es), repeat {repeat}: {runs[processes][-1]:,.0f} agent steps/s", flush=True)
    medians = {processes: statistics.median(values) for processes, values in runs.items()}
    ratio = medians[args.processes] / medians[1]
    print(
        f"median: 1 process {medians[1]:,.0f}, {args.processes} processes {medians[args.processes]:,.0f} (x{ratio:.2f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "recipe": RECIPE,
                "global_batch": BATCH,
                "epochs": args.epochs,
                "sps": runs,
                "median": medians,
                "ratio": ratio,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
