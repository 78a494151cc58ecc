"""Collapse on the small arena: what a collapse costs in behaviour and reward, against random ablation.

A baseline trains the small arena (`experiments.recipes.collapse_arena.small`); then every arm branches from
its checkpoint at epoch E (`collapse.init_from`), is collapsed (or cut), and trains `--after` more epochs.
Arms: the default thresholds; the same with `optimizer_state=reset`; the scale-aware and exact metrics; the
thresholds scaled down (the fidelity-versus-compression trade-off); and for each threshold setting the random
ablation at identical widths. Reported per arm: parameters kept, KL mean/max and value error on recent
observations, the collapse's wall time, training steps/s over the 5 epochs before (baseline) vs the 5 after,
and mean reward over the 5 epochs before vs after (and the first epoch after the cut).

Wall-clock budget: about 4 minutes of baseline plus about 40 s per arm (13 arms) on 2 cores, ~13 minutes.

    python benchmarks/collapse_arena.py [--epochs 80] [--collapse-epoch 60] [--after 10] [--out ...]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `experiments` lives at the repository root

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse.training.config import apply_override  # noqa: E402
from metta_collapse.training.metrics import read_metrics  # noqa: E402

DEFAULT = {"linear": 0.7, "cnn": 0.5, "lstm": 1.0, "critic": 0.8}
SCALES = [1.0, 0.5, 0.25, 0.1]


def arms() -> list[tuple[str, dict[str, str]]]:
    result = []
    for scale in SCALES:
        thresholds = {f"collapse.thresholds.{k}": str(round(v * scale, 4)) for k, v in DEFAULT.items()}
        label = "default" if scale == 1.0 else f"thresholds x{scale}"
        result.append((label, thresholds))
        result.append((f"{label}, random ablation", thresholds | {"collapse.mode": "random_ablation"}))
    result.append(("default, optimizer_state=reset", {"collapse.optimizer_state": "reset"}))
    result.append(("scale_aware", {"collapse.metric": "scale_aware"}))
    result.append(
        ("scale_aware, random ablation", {"collapse.metric": "scale_aware", "collapse.mode": "random_ablation"})
    )
    result.append(("exact", {"collapse.metric": "exact"}))
    return result


def run(train_dir: str, run_name: str, overrides: dict[str, str]) -> Path:
    tool = collapse_arena.small(run_name)
    for key, value in {
        "train_dir": train_dir,
        "wandb.enabled": "false",
        "trainer.checkpoint.wandb_checkpoint_interval": "0",
        **overrides,
    }.items():
        apply_override(tool, key, value)
    tool.invoke()
    return Path(train_dir) / tool.run


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=80, help="baseline epochs")
    parser.add_argument("--collapse-epoch", type=int, default=60)
    parser.add_argument("--after", type=int, default=10, help="epochs each arm trains after the cut")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/collapse_arena.json"))
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as train_dir:
        epoch_steps = collapse_arena.small().trainer.batch_size
        base = run(
            train_dir,
            "base",
            {
                "collapse.enabled": "false",
                "trainer.total_timesteps": str(args.epochs * epoch_steps),
                "trainer.checkpoint.checkpoint_interval": str(args.collapse_epoch),
            },
        )
        baseline = read_metrics(base / "metrics.jsonl")
        before = [m for m in baseline if args.collapse_epoch - 5 < m["metric/epoch"] <= args.collapse_epoch]
        rows = []
        for index, (label, overrides) in enumerate(arms()):
            branch = run(
                train_dir,
                f"arm{index}",
                overrides
                | {
                    "collapse.init_from": "base",
                    "collapse.epoch_idx": str(args.collapse_epoch),
                    "trainer.total_timesteps": str((args.collapse_epoch + args.after) * epoch_steps),
                    "collapse.seed": "1",
                },
            )
            record = json.loads((branch / "collapse.json").read_text())
            after = [m for m in read_metrics(branch / "metrics.jsonl") if m["metric/epoch"] > args.collapse_epoch]
            rows.append(
                {
                    "arm": label,
                    "run": branch.name,
                    "params_kept": record["params_after"] / record["params_before"],
                    "params_after": record["params_after"],
                    "kl_mean": record["kl_mean"],
                    "kl_max": record["kl_max"],
                    "value_err": record["value_err"],
                    "collapse_seconds": record["seconds"],
                    "sps_before": mean([m["overview/sps"] for m in before]),
                    "sps_after": mean([m["overview/sps"] for m in after[:5]]),
                    "reward_before": mean([m["experience/rewards"] for m in before]),
                    "reward_first_after": after[0]["experience/rewards"] if after else float("nan"),
                    "reward_after": mean([m["experience/rewards"] for m in after[:5]]),
                    "widths": {layer["name"]: layer["width_after"] for layer in record["layers"]},
                }
            )
            print(f"{label}: done ({time.time() - start:.0f}s)", flush=True)
    header = (
        f"{'arm':<36} {'kept':>6} {'KL mean':>9} {'KL max':>9} {'val err':>8} {'cut s':>6} "
        f"{'sps b/a':>13} {'reward before':>13} {'1st after':>9} {'after':>8} {'ratio':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['arm']:<36} {r['params_kept']:>6.1%} {r['kl_mean']:>9.2e} {r['kl_max']:>9.2e} "
            f"{r['value_err']:>8.2f} {r['collapse_seconds']:>6.2f} {r['sps_before']:>6.0f}/{r['sps_after']:<6.0f} "
            f"{r['reward_before']:>13.5f} {r['reward_first_after']:>9.5f} {r['reward_after']:>8.5f} "
            f"{r['reward_after'] / r['reward_before']:>6.2f}"
        )
    result = {
        "baseline_epochs": args.epochs,
        "collapse_epoch": args.collapse_epoch,
        "after_epochs": args.after,
        "epoch_agent_steps": epoch_steps,
        "wall_seconds": time.time() - start,
        "arms": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwall time {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
