"""The study's validation protocol on the small arena, scaled to 2 CPU cores: four arms, several seeds.

Per seed: a baseline trains `--epochs` epochs; at epoch E it is branched (`collapse.init_from`) into a collapse
at the default thresholds and a random ablation at identical widths, both continuing to the same total agent
steps (they inherit the baseline's first E epochs); the small architecture trains from scratch from step 0 for
the same total. Equal budgets are counted in agent steps from step 0. "Final reward" is the mean
`experience/rewards` over the last 10 % of the budget; each arm is reported as the mean and spread (min..max,
standard deviation) over seeds, with the reward just before and just after the cut. `metta-collapse compare`
draws the four arms of the first seed, and the seeds' mean curves are drawn per arm.

Wall-clock budget: about 6 minutes per seed at the defaults (40 epochs, E = 20), 18 minutes for 3 seeds.

    python benchmarks/validation.py [--seeds 3] [--epochs 40] [--collapse-epoch 20] [--out DIR]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` lives at the repository root

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse.cli import main as cli  # noqa: E402
from metta_collapse.training.config import apply_override  # noqa: E402
from metta_collapse.training.metrics import read_metrics  # noqa: E402

ARMS = {"baseline": None, "collapsed": "fibration", "random ablation": "random_ablation", "scratch": "scratch"}


def run(train_dir: Path, name: str | None, overrides: dict[str, object]) -> str:
    tool = collapse_arena.small(name)
    for key, value in {
        "train_dir": str(train_dir),
        "wandb.enabled": "false",
        "trainer.checkpoint.wandb_checkpoint_interval": "0",
        **overrides,
    }.items():
        apply_override(tool, key, str(value))
    tool.invoke()
    return tool.run


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--collapse-epoch", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/validation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir = args.out / "train_dir"
    epoch_steps = collapse_arena.small().trainer.batch_size
    total = args.epochs * epoch_steps
    tail = max(1, args.epochs // 10)
    start = time.time()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    first_seed_runs = []
    for seed in range(args.seeds):
        base = f"base_seed{seed}"
        runs = {
            "baseline": run(
                train_dir,
                base,
                {
                    "seed": seed,
                    "collapse.enabled": "false",
                    "trainer.total_timesteps": total,
                    "trainer.checkpoint.checkpoint_interval": args.collapse_epoch,
                },
            )
        }
        for arm, mode in list(ARMS.items())[1:]:
            runs[arm] = run(
                train_dir,
                f"{base}_{mode}",
                {
                    "seed": seed,
                    "collapse.init_from": base,
                    "collapse.epoch_idx": args.collapse_epoch,
                    "collapse.mode": mode,
                    "collapse.seed": seed,
                    "trainer.total_timesteps": total,
                },
            )
        for arm, name in runs.items():
            metrics = read_metrics(train_dir / name / "metrics.jsonl")
            rewards = [m["experience/rewards"] for m in metrics]
            record_path = train_dir / name / "collapse.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else None
            cut = [
                m["experience/rewards"]
                for m in metrics
                if m["metric/epoch"] in (args.collapse_epoch, args.collapse_epoch + 1)
            ]
            results[arm].append(
                {
                    "seed": seed,
                    "run": name,
                    "final_reward": statistics.fmean(rewards[-tail:]),
                    "agent_steps": metrics[-1]["metric/agent_step"],
                    "params": record["params_after"] if record else None,
                    "params_before": record["params_before"] if record else None,
                    "reward_at_cut": cut[0] if len(cut) == 2 and arm in ("collapsed", "random ablation") else None,
                    "reward_after_cut": cut[1] if len(cut) == 2 and arm in ("collapsed", "random ablation") else None,
                    "curve": [(m["metric/agent_step"], m["experience/rewards"]) for m in metrics],
                }
            )
        if seed == 0:
            first_seed_runs = list(runs.values())
        print(f"seed {seed} done ({time.time() - start:.0f}s)", flush=True)

    cli(
        [
            "compare",
            *first_seed_runs,
            "--train-dir",
            str(train_dir),
            "--smooth",
            "5",
            "--last",
            str(tail),
            "--out",
            str(args.out),
        ]
    )
    figure = Figure(figsize=(9, 5))
    axes = figure.subplots()
    for arm, entries in results.items():
        steps = [step for step, _ in entries[0]["curve"]]
        mean_curve = [statistics.fmean(e["curve"][i][1] for e in entries) for i in range(len(steps))]
        axes.plot(steps, mean_curve, label=f"{arm} (mean of {len(entries)} seeds)")
    axes.axvline(args.collapse_epoch * epoch_steps, color="gray", linestyle="--", label="collapse")
    axes.set_xlabel("agent steps")
    axes.set_ylabel("experience/rewards")
    axes.legend()
    figure.savefig(args.out / "validation.png", dpi=120)

    summary = {
        arm: {
            "final_reward": spread([e["final_reward"] for e in entries]),
            "params": entries[0]["params"],
            "runs": entries,
        }
        for arm, entries in results.items()
    }
    baseline_params = results["collapsed"][0]["params_before"]
    print(
        f"\nfinal reward = mean experience/rewards over the last {tail} of {args.epochs} epochs "
        f"({total:,} agent steps), {args.seeds} seeds"
    )
    print(f"{'arm':<16} {'params':>8} {'mean':>9} {'std':>9} {'min':>9} {'max':>9} {'at cut':>9} {'after cut':>9}")
    for arm, row in summary.items():
        f = row["final_reward"]
        at_cut = [e["reward_at_cut"] for e in row["runs"] if e["reward_at_cut"] is not None]
        after = [e["reward_after_cut"] for e in row["runs"] if e["reward_after_cut"] is not None]
        params = row["params"] if row["params"] is not None else baseline_params
        print(
            f"{arm:<16} {params if params is not None else '-':>8} {f['mean']:>9.5f} {f['std']:>9.5f} "
            f"{f['min']:>9.5f} {f['max']:>9.5f} "
            f"{statistics.fmean(at_cut) if at_cut else float('nan'):>9.5f} "
            f"{statistics.fmean(after) if after else float('nan'):>9.5f}"
        )
    (args.out / "validation.json").write_text(
        json.dumps(
            {
                "seeds": args.seeds,
                "epochs": args.epochs,
                "collapse_epoch": args.collapse_epoch,
                "epoch_agent_steps": epoch_steps,
                "final_reward_epochs": tail,
                "wall_seconds": time.time() - start,
                "arms": summary,
            },
            indent=2,
        )
    )
    print(f"\nwall time {time.time() - start:.0f}s; wrote {args.out}/validation.json, validation.png, compare.*")


if __name__ == "__main__":
    main()
