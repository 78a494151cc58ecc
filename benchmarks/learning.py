"""Learning: train the `fast` policy on the small arena for a wall-clock budget; compare with a random policy.

Training runs on 4 copies of the small arena (24 agents) with PuffeRL's PPO. Afterwards the final policy and
a uniformly random policy are measured the same way (reward per agent-step over fresh episodes); the target is
at least 3x random. Prints the learning curve (reward per agent-step per epoch) and the median training steps
per second, and writes everything to JSON.

    python benchmarks/learning.py [--budget-minutes 15] [--out benchmarks/results/learning.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout, even beside an installed copy

from experiments.recipes.arena_basic_easy_shaped import SMALL  # noqa: E402
from metta_collapse.training.arena import make_small_arena, make_vecenv
from metta_collapse.training.config import TrainTool, apply_override
from metta_collapse.training.policy import FastPolicy
from metta_collapse.training.trainer import TrainerState, train

TARGET_RATIO = 3.0
NUM_ENVS = int(SMALL["training_env.num_envs"])
# the small recipe's PPO settings (see experiments/recipes/arena_basic_easy_shaped.py for why they differ)
SETTINGS = {
    key: value
    for key, value in SMALL.items()
    if key.startswith("trainer.") and "checkpoint" not in key and key != "trainer.total_timesteps"
}


def measure_reward(policy: FastPolicy | None, agent_steps: int, seed: int) -> float:
    """Mean reward per agent-step of `policy` (sampling its actions), or of random actions if None."""
    vecenv = make_vecenv(make_small_arena(), NUM_ENVS, seed)
    vecenv.async_reset(seed)
    num_agents = vecenv.num_agents
    rng = np.random.default_rng(seed)
    state = {}
    if policy is not None:
        state = {"lstm_h": torch.zeros(num_agents, policy.hidden_size)}
        state["lstm_c"] = torch.zeros_like(state["lstm_h"])
    total, steps = 0.0, 0
    while steps < agent_steps:
        observations, rewards = vecenv.recv()[:2]
        total += float(rewards.sum())
        if policy is None:
            actions = rng.integers(0, vecenv.single_action_space.n, num_agents)
        else:
            with torch.no_grad():
                logits, _ = policy.forward_eval(torch.as_tensor(observations), state)
            actions = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1).numpy()
        vecenv.send(actions.astype(np.int32))
        steps += num_agents
    vecenv.close()
    return total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="wall-clock budget for training")
    parser.add_argument("--eval-steps", type=int, default=100_000, help="agent-steps measured per policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learning.json"))
    args = parser.parse_args()

    random_reward = measure_reward(None, args.eval_steps, seed=10_000 + args.seed)
    print(f"random policy: {random_reward:.5f} reward per agent-step")

    budget = args.budget_minutes * 60
    start = time.time()

    def stop_at_budget(state: TrainerState) -> None:
        state.stop = time.time() - start >= budget

    with tempfile.TemporaryDirectory() as train_dir:
        tool = TrainTool(run="learning", train_dir=train_dir, seed=args.seed)
        tool.training_env.arena, tool.training_env.num_envs = "small", NUM_ENVS
        tool.trainer.total_timesteps = 10**12
        tool.wandb.enabled = False
        for key, value in SETTINGS.items():
            apply_override(tool, key, str(value))
        final = train(tool, on_epoch_end=stop_at_budget)
        train_seconds = time.time() - start
        curve = [
            {
                "epoch": m["metric/epoch"],
                "agent_step": m["metric/agent_step"],
                "seconds": round(m["metric/total_time"], 1),
                "reward_per_step": m["experience/rewards"],
                "sps": m["overview/sps"],
            }
            for m in map(json.loads, (Path(train_dir) / "learning" / "metrics.jsonl").read_text().splitlines())
        ]

    policy = final.policy.eval()
    trained_reward = measure_reward(policy, args.eval_steps, seed=20_000 + args.seed)
    median_sps = statistics.median(point["sps"] for point in curve)
    ratio = trained_reward / random_reward

    print("\nlearning curve (reward per agent-step during training):")
    print(f"{'epoch':>6} {'agent steps':>12} {'seconds':>8} {'reward/step':>12}")
    shown = curve[:: max(1, len(curve) // 30)]
    if shown[-1] is not curve[-1]:
        shown.append(curve[-1])
    for point in shown:
        reward = point["reward_per_step"]
        print(f"{point['epoch']:>6} {point['agent_step']:>12,} {point['seconds']:>8.0f} {reward:>12.5f}")
    print(f"\nmedian training speed: {median_sps:,.0f} agent-steps/s over {len(curve)} epochs")
    print(f"final policy:  {trained_reward:.5f} reward per agent-step")
    print(f"random policy: {random_reward:.5f} reward per agent-step")
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"ratio: {ratio:.1f}x random (target >= {TARGET_RATIO:.0f}x): {verdict}")

    result = {
        "budget_minutes": args.budget_minutes,
        "train_seconds": train_seconds,
        "epochs": len(curve),
        "agent_steps": curve[-1]["agent_step"],
        "median_sps": median_sps,
        "random_reward_per_step": random_reward,
        "trained_reward_per_step": trained_reward,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "passed": ratio >= TARGET_RATIO,
        "settings": {**SETTINGS, "training_env.arena": "small", "training_env.num_envs": NUM_ENVS},
        "eval_agent_steps": args.eval_steps,
        "curve": curve,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
