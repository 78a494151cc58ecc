"""Closed loop on the small arena: does a collapse keep the reward the policy earned?

Per seed, a baseline trains the small arena (`experiments.recipes.collapse_arena.small`, collapse off) to epoch E;
every arm branches from its epoch-E checkpoint, is collapsed at `collapse.budget.params` (default 0.25), and trains
`--after` more epochs. The continuation is the same checkpoint resumed uncollapsed, so every arm and the
continuation restart their environments at E alike. Arms: the recipe's default units (basis) + refit, cosine +
refit, cosine plain (the study's merge), random units + refit at the default's widths (the null model, same help).

Reported per arm and seed: parameters kept, the record's report-part KL mean / value error, the collapse's wall
time, and mean `experience/rewards` over the epochs after the cut against the continuation's over the same epochs;
then per arm the seed mean ± standard deviation of the difference. Passes if default + refit >= cosine plain and
default + refit falls below the continuation by no more than the larger seed standard deviation of the two.

Wall-clock budget on 2 cores: ~100 s of baseline per seed plus ~25 s per arm: about 10 minutes for 3 seeds.

    python benchmarks/collapse_arena.py [--seeds 0 1 2] [--epochs 40] [--after 3] [--budget 0.25] [--out ...]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout, even beside an installed copy

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse.training.checkpoint import checkpoint_epochs  # noqa: E402
from metta_collapse.training.metrics import read_metrics  # noqa: E402
from metta_collapse.training.runner import build_tool  # noqa: E402

ARMS = {
    "default units + refit": {},
    "cosine + refit": {"collapse.metric": "cosine"},
    "cosine plain": {"collapse.metric": "cosine", "collapse.refit": "false"},
    "random units + refit": {"collapse.mode": "random_ablation"},
    # what Adam's moments should become for refitted rows: mapped (the default) or started afresh
    "default + refit, Adam reset": {"collapse.optimizer_state": "reset"},
}


def run(train_dir: str, run_name: str, overrides: dict[str, str]) -> Path:
    """The run as its command line would give it (a branch then keeps these settings over its source's)."""
    settings = {"train_dir": train_dir, "wandb.enabled": "false", "trainer.checkpoint.wandb_checkpoint_interval": "0"}
    argv = [f"{key}={value}" for key, value in {**settings, **overrides}.items()]
    build_tool(["experiments.recipes.collapse_arena.small", f"run={run_name}", *argv]).invoke()
    return Path(train_dir) / run_name


def rewards_after(run_dir: Path, epoch: int, after: int) -> float:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    return statistics.fmean(m["experience/rewards"] for m in metrics if epoch < m["metric/epoch"] <= epoch + after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40, help="baseline epochs before the cut")
    parser.add_argument("--after", type=int, default=3, help="epochs each arm trains after the cut")
    parser.add_argument("--budget", type=float, default=0.25, help="collapse.budget.params of every arm")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/collapse_arena.json"))
    args = parser.parse_args()
    start = time.time()
    epoch_steps = collapse_arena.small().trainer.batch_size
    total = str((args.epochs + args.after) * epoch_steps)
    rows = []
    with tempfile.TemporaryDirectory() as train_dir:
        for seed in args.seeds:
            base = f"base{seed}"
            run(
                train_dir,
                base,
                {
                    "seed": str(seed),
                    "collapse.enabled": "false",
                    "trainer.total_timesteps": str(args.epochs * epoch_steps),
                    "trainer.checkpoint.checkpoint_interval": str(args.epochs),
                },
            )
            source = checkpoint_epochs(Path(train_dir) / base / "checkpoints", base)[args.epochs]
            continuation = Path(train_dir) / f"cont{seed}"
            (continuation / "checkpoints").mkdir(parents=True)
            shutil.copy(source, continuation / "checkpoints" / source.name.replace(base, f"cont{seed}", 1))
            shutil.copy(Path(train_dir) / base / "metrics.jsonl", continuation / "metrics.jsonl")
            run(
                train_dir,
                f"cont{seed}",
                {"seed": str(seed), "collapse.enabled": "false", "trainer.total_timesteps": total},
            )
            reference = rewards_after(continuation, args.epochs, args.after)
            for arm, overrides in ARMS.items():
                branch = run(
                    train_dir,
                    f"s{seed}_{len(rows)}",
                    overrides
                    | {
                        "seed": str(seed),
                        "collapse.seed": str(seed),
                        "collapse.init_from": base,
                        "collapse.epoch_idx": str(args.epochs),
                        "collapse.budget.params": str(args.budget),
                        "trainer.total_timesteps": total,
                    },
                )
                record = json.loads((branch / "collapse.json").read_text())
                reward = rewards_after(branch, args.epochs, args.after)
                rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "params_kept": record["params_after"] / record["params_before"],
                        "kl_mean": record["kl_mean"],
                        "value_err": record["value_err"],
                        "collapse_seconds": record["seconds"],
                        "reward_after": reward,
                        "continuation": reference,
                        "difference": reward - reference,
                        "widths": {layer["name"]: layer["width_after"] for layer in record["layers"]},
                    }
                )
                print(
                    f"seed {seed}, {arm}: {reward:.5f} vs {reference:.5f} ({time.time() - start:.0f}s)",
                    flush=True,
                )
    summary = {}
    header = f"{'arm':<28} {'kept':>6} {'KL mean':>9} {'val err':>8} {'cut s':>6} {'reward after':>18}"
    header += f" {'- continuation':>20}"
    print("\n" + header + "\n" + "-" * len(header))
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        rewards, differences = [r["reward_after"] for r in mine], [r["difference"] for r in mine]
        spread = statistics.stdev(rewards) if len(rewards) > 1 else float("nan")
        summary[arm] = {
            "reward_mean": statistics.fmean(rewards),
            "reward_std": spread,
            "difference_mean": statistics.fmean(differences),
            "difference_std": statistics.stdev(differences) if len(differences) > 1 else float("nan"),
        }
        print(
            f"{arm:<28} {statistics.fmean(r['params_kept'] for r in mine):>6.1%} "
            f"{statistics.fmean(r['kl_mean'] for r in mine):>9.2e} "
            f"{statistics.fmean(r['value_err'] for r in mine):>8.3f} "
            f"{statistics.median(r['collapse_seconds'] for r in mine):>6.1f} "
            f"{summary[arm]['reward_mean']:>8.5f} ± {spread:<7.5f} "
            f"{summary[arm]['difference_mean']:>+9.5f} ± {summary[arm]['difference_std']:<7.5f}"
        )
    continuations = [r["continuation"] for r in rows if r["arm"] == "default units + refit"]
    default, plain = summary["default units + refit"], summary["cosine plain"]
    continuation_std = statistics.stdev(continuations) if len(continuations) > 1 else float("nan")
    verdict = {
        "default_at_least_cosine_plain": default["reward_mean"] >= plain["reward_mean"],
        "default_within_spread_of_continuation": -default["difference_mean"]
        <= max(default["reward_std"], continuation_std),
    }
    print(f"continuation {statistics.fmean(continuations):.5f} ± {continuation_std:.5f}; {verdict}")
    result = {
        "seeds": args.seeds,
        "baseline_epochs": args.epochs,
        "after_epochs": args.after,
        "budget_params": args.budget,
        "epoch_agent_steps": epoch_steps,
        "wall_seconds": time.time() - start,
        "continuation": {"mean": statistics.fmean(continuations), "std": continuation_std},
        "summary": summary,
        "verdict": verdict,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwall time {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
