"""Metta's arena_basic_easy_shaped recipe, embedded: the 24-agent arena trained with PuffeRL's PPO.

    ./tools/run.py experiments.recipes.arena_basic_easy_shaped.train run=base trainer.total_timesteps=100000
    ./tools/run.py experiments.recipes.arena_basic_easy_shaped.small run=demo

`small` trains four copies of the small arena (24 agents) with PPO settings sized for 2 CPU cores: the
setting of the tests, demos and CPU benchmarks.
"""

from metta_collapse.training.config import TrainTool, apply_override

SMALL = {
    "training_env.arena": "small",
    "training_env.num_envs": 4,
    "trainer.batch_size": 12288,
    "trainer.minibatch_size": 2048,
    "trainer.bptt_horizon": 64,
    "trainer.total_timesteps": 983_040,  # 80 epochs, about 5 minutes on 2 cores
    "trainer.checkpoint.checkpoint_interval": 10,
    "trainer.checkpoint.wandb_checkpoint_interval": 10,
}


def train(run: str | None = None) -> TrainTool:
    return TrainTool(run=run)


def small(run: str | None = None) -> TrainTool:
    tool = train(run)
    for key, value in SMALL.items():
        apply_override(tool, key, str(value))
    return tool
