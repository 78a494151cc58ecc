"""Metta's arena_basic_easy_shaped recipe, embedded: the 24-agent arena trained with PuffeRL's PPO.

    ./tools/run.py experiments.recipes.arena_basic_easy_shaped.train run=base trainer.total_timesteps=100000

`training_env.arena=small` trains the small arena instead (tests, demos, CPU benchmarks).
"""

from metta_collapse.training.config import TrainTool


def train(run: str | None = None) -> TrainTool:
    return TrainTool(run=run)
