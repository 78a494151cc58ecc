"""What a collapse saves in compute: training speed and the policy's own latency, before and after.

From a trained small-arena checkpoint (`--checkpoint`, e.g. the epoch-40 one of `collapse_arena.small`), three
runs in one temporary folder: **before** (resumed, never collapsed) and the checkpoint collapsed at the end of
its next epoch at `budget.params=0.25` and at `budget.macs=0.25`. Then `--rounds` rounds, each training every
run `--epochs` more epochs in turn (the order rotating between rounds), the first epoch of each segment dropped
(its environments just started): agent steps/s and the epoch's time split (`performance/*_seconds`: stepping the
environments, the rollout's policy forward, the update, the rest), medians over the epochs kept. The ceiling the
environment leaves: agent steps/s with the environment's time taken out of the epoch. The split's own cost: the
profile's calls per epoch (counted in the first round) times the median seconds of one call, over the epoch.

Per policy, alone: parameters, multiply-adds per agent step (the collapse record's count) and the latency of one
recurrent step per agent, for a batch of 96 agents (the full arena's 24 x 4) on observations recorded from the
full arena's held-out "report" maps, median of `--repeats` passes over the recorded steps, at the runtime's
thread setting. Everything side by side in one process: run it on an idle machine.

    python benchmarks/speed.py --checkpoint CKPT [--rounds 3] [--epochs 3] [--repeats 5] [--out ...]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import pufferlib.pufferl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout, even beside an installed copy

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse.training.checkpoint import latest_checkpoint, load_checkpoint, policy_from_checkpoint  # noqa: E402
from metta_collapse.training.config import apply_override  # noqa: E402
from metta_collapse.training.metrics import TIME_SPLIT, read_metrics  # noqa: E402
from metta_collapse.training.rollout import rollouts  # noqa: E402

ARMS = {"before": {}, "budget.params=0.25": {"collapse.budget.params": "0.25"}}
ARMS["budget.macs=0.25"] = {"collapse.budget.macs": "0.25"}
AGENTS, COPIES, LATENCY_STEPS = 96, 4, 32


def train_to(train_dir: str, arm: str, collapse_epoch: int, epochs: int) -> Path:
    """Train the arm's run to `epochs` epochs (resuming it); returns its folder."""
    run = arm.replace("=", "").replace(".", "_")
    tool = collapse_arena.small(run)
    overrides = {
        "train_dir": train_dir,
        "wandb.enabled": "false",
        "trainer.total_timesteps": str(epochs * tool.trainer.batch_size),
        "collapse.epoch_idx": str(collapse_epoch),
        **(ARMS[arm] or {"collapse.enabled": "false"}),
    }
    for key, value in overrides.items():
        apply_override(tool, key, value)
    tool.invoke()
    return tool.run_dir


def latency(policy: torch.nn.Module, observations: torch.Tensor, repeats: int) -> float:
    """Median seconds per agent step of one recurrent step of every agent at once."""
    timings = []
    with torch.no_grad():
        for _ in range(repeats):
            state: dict = {}
            start = time.perf_counter()
            for step in range(observations.shape[1]):
                policy.forward_eval(observations[:, step], state)
            timings.append((time.perf_counter() - start) / observations.shape[:2].numel())
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run and round; the first is dropped")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch of each segment is dropped")
    start_epoch = load_checkpoint(args.checkpoint)["epoch"]
    epochs = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as train_dir:
        run_dirs = {}
        for arm in ARMS:  # the collapse, at the end of the first epoch after the checkpoint
            run = arm.replace("=", "").replace(".", "_")
            folder = Path(train_dir) / run / "checkpoints"
            folder.mkdir(parents=True)
            shutil.copy(args.checkpoint, folder / f"{run}__{args.checkpoint.name.split('__', 1)[1]}")
            run_dirs[arm] = train_to(train_dir, arm, start_epoch + 1, start_epoch + 1)
        reached, calls = start_epoch + 1, [0]
        profile_call = pufferlib.pufferl.Profile.__call__

        def counted(*call_args: object, **call_kwargs: object) -> None:
            calls[0] += 1
            profile_call(*call_args, **call_kwargs)

        for round_ in range(args.rounds):
            pufferlib.pufferl.Profile.__call__ = counted if round_ == 0 else profile_call
            order = list(ARMS)[round_ % len(ARMS) :] + list(ARMS)[: round_ % len(ARMS)]
            for arm in order:
                train_to(train_dir, arm, start_epoch + 1, reached + args.epochs)
                kept = range(reached + 2, reached + args.epochs + 1)  # the segment's first epoch dropped
                epochs[arm] += [m for m in read_metrics(run_dirs[arm] / "metrics.jsonl") if m["metric/epoch"] in kept]
            reached += args.epochs
        pufferlib.pufferl.Profile.__call__ = profile_call
        calls_per_epoch = calls[0] / (len(ARMS) * args.epochs)
        profile = pufferlib.pufferl.Profile(frequency=1)
        call_seconds = min(timeit.repeat(lambda: profile("env", 0), number=10_000, repeat=5)) / 10_000
        records = {arm: json.loads((run_dirs[arm] / "collapse.json").read_text()) for arm in ARMS if ARMS[arm]}
        policies = {
            arm: policy_from_checkpoint(
                load_checkpoint(latest_checkpoint(run_dirs[arm] / "checkpoints", run_dirs[arm].name))
            )
            for arm in ARMS
        }
    threads = collapse_arena.small().torch_threads
    torch.set_num_threads(threads)
    full_arena = collapse_arena.train().training_env.make_config()
    observations, _, _ = rollouts(policies["before"], full_arena, COPIES, LATENCY_STEPS, seed=0, stream="report")
    assert observations.shape[0] == AGENTS, observations.shape
    any_record = next(iter(records.values()))
    results = {}
    for arm, metrics in epochs.items():
        record = records.get(arm)
        split = {part: statistics.median(m[f"performance/{part}_seconds"] for m in metrics) for part in TIME_SPLIT}
        epoch_seconds = statistics.median(m["performance/epoch_seconds"] for m in metrics)
        steps = metrics[0]["overview/sps"] * metrics[0]["performance/epoch_seconds"]
        results[arm] = {
            "epochs": len(metrics),
            "sps": [m["overview/sps"] for m in metrics],
            "median_sps": statistics.median(m["overview/sps"] for m in metrics),
            "median_epoch_seconds": epoch_seconds,
            "median_split_seconds": split,
            "ceiling_sps": statistics.median(
                m["overview/sps"]
                * m["performance/epoch_seconds"]
                / (m["performance/epoch_seconds"] - m["performance/env_seconds"])
                for m in metrics
            ),
            "agent_steps_per_epoch": round(steps),
            "params": sum(p.numel() for p in policies[arm].parameters()),
            "macs_per_step": record["macs_per_step_after"] if record else any_record["macs_per_step_before"],
            "latency_seconds": latency(policies[arm], observations, args.repeats),
            "layers": [  # before: the uncollapsed layers, from a collapse record
                {
                    key: layer[key]
                    for key in ("name", "width_before", "macs_before", "width_after", "macs_after")[
                        : 5 if record else 3
                    ]
                }
                for layer in (record or any_record)["layers"]
            ],
        }
    for arm, result in results.items():
        base = results["before"]
        split = ", ".join(f"{part} {seconds:.2f}s" for part, seconds in result["median_split_seconds"].items())
        print(
            f"{arm}: {result['median_sps']:,.0f} agent steps/s ({result['median_sps'] / base['median_sps']:.2f}x, "
            f"median of {result['epochs']} epochs; ceiling without the environment {result['ceiling_sps']:,.0f}), "
            f"epoch {result['median_epoch_seconds']:.2f}s: {split}; {result['macs_per_step']:,} multiply-adds "
            f"({result['macs_per_step'] / base['macs_per_step']:.1%}), {result['params']:,} parameters, "
            f"{result['latency_seconds'] * 1e6:.1f} us per agent step alone "
            f"({base['latency_seconds'] / result['latency_seconds']:.2f}x faster)"
        )
    overhead = calls_per_epoch * call_seconds / results["before"]["median_epoch_seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "rounds": args.rounds,
                "epochs_per_round": args.epochs,
                "torch_threads": threads,
                "latency_batch": AGENTS,
                "profile_calls_per_epoch": calls_per_epoch,
                "profile_call_seconds": call_seconds,
                "profile_overhead": overhead,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"the time split: {calls_per_epoch:,.0f} profile calls per epoch, {overhead:.3%} of an epoch")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
