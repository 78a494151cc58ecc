"""Metta's arena_basic_easy_shaped recipe, embedded: the 24-agent arena trained with PuffeRL's PPO.

    ./tools/run.py experiments.recipes.arena_basic_easy_shaped.train run=base trainer.total_timesteps=100000
    ./tools/run.py experiments.recipes.arena_basic_easy_shaped.small run=demo

`small` trains four copies of the small arena (24 agents) with PPO settings sized for 2 CPU cores: the
setting of the demos and CPU benchmarks. Against Metta's PPO defaults: 24 minibatches per epoch instead of 6,
twice the learning rate, and the gradient-norm and value clips opened (Metta's 0.5 and 0.1 starve the value
function at this scale: its explained variance stays near 0). benchmarks/learning.py measures it.

Installed into current Metta, this path is the baseline of collapse_arena there: Metta's own recipe with the
`fast` policy, trained exactly as collapse_arena trains it, never collapsed. September 2025 Metta has its own module
at this path, which is found first (see `experiments.recipes`).
"""

from metta_collapse.integrations import detect_era

if detect_era() == "current":
    from metta_collapse.integrations.metta import metta_train

    def train():  # noqa: ANN201 - Metta's TrainTool subclass
        tool = metta_train()
        tool.collapse.enabled = False
        return tool

else:
    from metta_collapse.training.config import TrainTool, apply_override

    SMALL = {
        "training_env.arena": "small",
        "training_env.num_envs": 4,
        "trainer.batch_size": 12288,
        "trainer.minibatch_size": 512,
        "trainer.bptt_horizon": 64,
        "trainer.optimizer.learning_rate": 0.001,
        "trainer.losses.loss_configs.ppo.max_grad_norm": 5.0,
        "trainer.losses.loss_configs.ppo.vf_clip_coef": 10.0,
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
