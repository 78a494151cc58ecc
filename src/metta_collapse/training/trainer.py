"""The training loop: PuffeRL's PPO (evaluate, then train, per epoch), Metta-style checkpoints and metrics.

After every epoch an optional `on_epoch_end(TrainerState)` callback runs. It may change the policy in place
(replace parameters, shrink layers) as long as it also updates PuffeRL's optimizer object in place and resizes
the recurrent-state buffers `lstm_h` / `lstm_c`: nothing here keeps parameter lists or shapes across epochs.
"""

import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pufferlib.pufferl
import torch

from metta_collapse.training import distributed
from metta_collapse.training.arena import make_vecenv
from metta_collapse.training.checkpoint import (
    policy_from_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from metta_collapse.training.config import TrainTool
from metta_collapse.training.metrics import TIME_SPLIT, MetricsLogger
from metta_collapse.training.policy import FastPolicy, make_policy

# Importing pufferl turns every RuntimeWarning into an error and makes Ctrl+C exit with status 0 without
# cleanup; undo both for the rest of the process.
warnings.filterwarnings("default", category=RuntimeWarning)
# PuffeRL enters a float32 autocast context, which CPU autocast declines with a warning every epoch
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass


class Trainer(pufferlib.pufferl.PuffeRL):
    """PuffeRL without its full-screen dashboard and its own checkpoint files (Metta-style ones instead), its
    profile taken every epoch (PuffeRL's default: every fifth)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.profile = pufferlib.pufferl.Profile(frequency=1)

    def time_split(self) -> dict[str, float]:
        """Seconds spent so far in each part of `TIME_SPLIT`."""
        return {
            part: sum(self.profile.profiles[s]["elapsed"] for s in sections) for part, sections in TIME_SPLIT.items()
        }

    def print_dashboard(self, *args: object, **kwargs: object) -> None:
        pass

    def save_checkpoint(self) -> None:
        pass

    def mean_and_log(self) -> dict:
        # under torch.distributed PuffeRL returns its logs on ranks other than 0 only; its means stay in `stats`
        super().mean_and_log()
        return {f"environment/{name}": value for name, value in self.stats.items()}


@dataclass
class TrainerState:
    """What an epoch-end callback sees. Everything is read live from the trainer."""

    trainer: Trainer
    tool: TrainTool
    # this epoch's metrics; a callback may add entries before they are written
    metrics: dict[str, float] = field(default_factory=dict)
    # plain values saved with every checkpoint and restored on resume (e.g. the record of a collapse)
    extra: dict = field(default_factory=dict)
    # a callback sets this to end training after the current epoch (with a final checkpoint)
    stop: bool = False
    # a callback sets this to checkpoint the current epoch whatever the interval (e.g. right after a collapse)
    checkpoint: bool = False
    # training processes (torchrun); each trains 1/world of every batch
    world: int = 1

    @property
    def policy(self) -> FastPolicy:
        return distributed.unwrap(self.trainer.uncompiled_policy)

    def train_policy(self, policy: FastPolicy) -> None:
        """Train `policy` from now on: the one given, or this one after its parameters were replaced (under
        torchrun its replica wrapper is rebuilt around the new parameters)."""
        self.trainer.policy = self.trainer.uncompiled_policy = distributed.replica(policy)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def lstm_h(self) -> dict[int, torch.Tensor]:
        return self.trainer.lstm_h

    @property
    def lstm_c(self) -> dict[int, torch.Tensor]:
        return self.trainer.lstm_c

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def agent_step(self) -> int:
        """Agent steps of all processes together (PuffeRL counts its own)."""
        return self.trainer.global_step * self.world

    @property
    def observations(self) -> torch.Tensor:
        """The last rollout's token observations, (segments, bptt_horizon, tokens, 3) uint8."""
        return self.trainer.observations


def puffer_config(tool: TrainTool, seed: int, world: int = 1) -> dict:
    """PuffeRL's settings for one of `world` processes, which trains 1/world of every batch and minibatch."""
    t = tool.trainer
    ppo = t.losses.loss_configs.ppo
    opt = t.optimizer
    return {
        "env": tool.training_env.arena,
        "seed": seed,  # PuffeRL resets the environments with it
        "device": tool.device,
        "torch_deterministic": False,
        "cpu_offload": False,
        "use_rnn": True,
        "compile": False,
        "compile_mode": "default",
        "compile_fullgraph": False,
        "precision": "float32",
        # PuffeRL sizes its schedules by whole epochs; a run always trains at least one
        "total_timesteps": max(t.total_timesteps, t.batch_size) // world,
        "batch_size": t.batch_size // world,
        "bptt_horizon": t.bptt_horizon,
        "minibatch_size": t.minibatch_size // world,
        "max_minibatch_size": t.minibatch_size // world,
        "update_epochs": t.update_epochs,
        "optimizer": opt.type,
        "learning_rate": opt.learning_rate,
        "adam_beta1": opt.beta1,
        "adam_beta2": opt.beta2,
        "adam_eps": opt.eps,
        # constant learning rate, as Metta's default
        "anneal_lr": False,
        "gamma": ppo.gamma,
        "gae_lambda": ppo.gae_lambda,
        "clip_coef": ppo.clip_coef,
        "vf_coef": ppo.vf_coef,
        "vf_clip_coef": ppo.vf_clip_coef,
        "ent_coef": ppo.ent_coef,
        "max_grad_norm": ppo.max_grad_norm,
        "vtrace_rho_clip": ppo.vtrace.rho_clip,
        "vtrace_c_clip": ppo.vtrace.c_clip,
        "prio_alpha": ppo.prioritized_experience_replay.prio_alpha,
        "prio_beta0": ppo.prioritized_experience_replay.prio_beta0,
        # PuffeRL's own checkpointing is switched off in Trainer; it still reads these
        "checkpoint_interval": 1,
        "data_dir": str(tool.run_dir),
    }


def epoch_metrics(
    state: TrainerState, logs: dict, epoch_seconds: float, epoch_steps: int, wall_time: float, split: dict
) -> dict:
    """`split`: this epoch's seconds per part of `TIME_SPLIT`."""
    trainer = state.trainer
    metrics = {
        "metric/epoch": trainer.epoch,
        "metric/agent_step": state.agent_step,
        "metric/total_time": wall_time,
        "overview/sps": epoch_steps / epoch_seconds,
        "performance/epoch_seconds": epoch_seconds,
        **{f"performance/{part}_seconds": seconds for part, seconds in split.items()},
        "experience/rewards": trainer.rewards.mean().item(),
        "trainer/learning_rate": trainer.optimizer.param_groups[0]["lr"],
        **{f"losses/{name}": value for name, value in trainer.losses.items()},
    }
    for name, value in logs.items():
        if name.startswith("environment/"):
            metrics[name.removeprefix("environment/")] = float(value)
    return metrics


def train(tool: TrainTool, on_epoch_end: Callable[[TrainerState], None] | None = None) -> TrainerState:
    """Train `tool.run` (resuming from its latest checkpoint, if any) until `trainer.total_timesteps`. Under
    torchrun each process trains its own environments and 1/WORLD_SIZE of every batch; rank 0 alone writes."""
    tool.start_processes()
    env_cfg = tool.training_env.make_config()
    num_envs = tool.training_env.copies(env_cfg.game.num_agents)
    world, main = distributed.world_size(), distributed.is_main()
    if tool.trainer.evaluation.evaluate_interval and main:
        print("note: the embedded runtime has no evaluator; trainer.evaluation.evaluate_interval is ignored")

    with distributed.main_first():  # rank 0 sets torn checkpoints aside
        resume_from, checkpoint = resume_checkpoint(tool.checkpoint_dir, tool.run)
    seed = tool.seed
    if checkpoint is not None:  # a resumed segment draws afresh from the seed and its epoch: no replayed opening
        seed = int(np.random.SeedSequence([tool.seed, checkpoint["epoch"]]).generate_state(1)[0])
    if distributed.rank():  # other environments in every process; the weights come from rank 0
        seed = int(np.random.SeedSequence([seed, distributed.rank()]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    vecenv = make_vecenv(env_cfg, num_envs, seed)
    policy = policy_from_checkpoint(checkpoint) if checkpoint else make_policy(vecenv.driver_env)
    policy = policy.to(tool.device)
    num_params = sum(p.numel() for p in policy.parameters())
    if main:
        print(f"run {tool.run} in {tool.run_dir}")
        print(
            f"policy {tool.policy_architecture.name}: {num_params:,} parameters"
            + (f", {world} processes" if world > 1 else "")
        )

    trainer = Trainer(puffer_config(tool, seed, world), vecenv, distributed.replica(policy))
    # its CPU/GPU sampling thread only feeds the dashboard
    trainer.utilization.stop()
    wall_offset = 0.0
    if checkpoint:
        trainer.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        trainer.epoch = checkpoint["epoch"]
        trainer.global_step = checkpoint["agent_step"] // world
        wall_offset = checkpoint["wall_time"]
        branch = checkpoint.get("extra", {}).get("collapse", {})
        if main and branch.get("source") and branch["epoch"] == trainer.epoch:  # the branch's first checkpoint
            print(f"{tool.run} trains on from its branch checkpoint {resume_from.name}")
        elif main:
            print(
                f"resuming {tool.run} from {resume_from.name}: epoch {trainer.epoch}, step {checkpoint['agent_step']}"
            )

    state = TrainerState(trainer, tool, extra=checkpoint.get("extra", {}) if checkpoint else {}, world=world)
    total = tool.trainer.total_timesteps
    ckpt = tool.trainer.checkpoint
    logger = MetricsLogger(tool, start_epoch=trainer.epoch) if main else None
    threads = torch.get_num_threads()
    torch.set_num_threads(tool.torch_threads)
    start = time.time()
    try:
        while state.agent_step < total and not state.stop:
            epoch_start, steps_before, split_before = time.time(), state.agent_step, trainer.time_split()
            trainer.evaluate()
            # PuffeRL refreshes its loss and environment statistics only when it logs, at most every 0.25 s
            trainer.last_log_time = 0.0
            logs = trainer.train() or {}
            wall_time = wall_offset + time.time() - start
            split = {part: seconds - split_before[part] for part, seconds in trainer.time_split().items()}
            state.metrics = epoch_metrics(
                state, logs, time.time() - epoch_start, state.agent_step - steps_before, wall_time, split
            )
            if on_epoch_end is not None:
                on_epoch_end(state)
            done = state.agent_step >= total or state.stop
            if logger is None:
                state.checkpoint = False
                continue
            logger.log(state.metrics)
            print_progress(state.metrics, total)
            if done or state.checkpoint or (ckpt.checkpoint_interval and trainer.epoch % ckpt.checkpoint_interval == 0):
                state.checkpoint = False
                path = save_checkpoint(
                    tool.checkpoint_dir,
                    tool.run,
                    state.policy,
                    trainer.optimizer,
                    trainer.epoch,
                    state.agent_step,
                    wall_time,
                    extra=state.extra,
                    arena=tool.training_env.arena,
                )
                if ckpt.wandb_checkpoint_interval and (done or trainer.epoch % ckpt.wandb_checkpoint_interval == 0):
                    logger.log_checkpoint(path)
        if not state.metrics and main:
            print(f"{tool.run} already trained {state.agent_step:,} of {total:,} agent steps; nothing to do")
    finally:
        torch.set_num_threads(threads)
        vecenv.close()
        if logger is not None:
            logger.close()
    return state


def print_progress(metrics: dict[str, float], total: int) -> None:
    line = (
        f"epoch {metrics['metric/epoch']} | agent steps {metrics['metric/agent_step']:,}/{total:,} | "
        f"{metrics['overview/sps']:,.0f} sps | reward/step {metrics['experience/rewards']:.4f}"
    )
    # an epoch in which no episode ended has no hearts: a dash keeps the columns in place
    hearts = metrics.get("env_agent/heart.gained")
    line += f" | hearts/episode {'–' if hearts is None else f'{hearts:.2f}'}"
    losses = [(name, metrics.get(f"losses/{key}")) for name, key in LOSSES]
    line += "".join(f" | {name} {value:.3g}" for name, value in losses if value is not None)
    split = "/".join(f"{metrics[f'performance/{part}_seconds']:.2f}" for part in TIME_SPLIT)
    line += f" | {'/'.join(TIME_SPLIT)} {split}s"
    print(line + f" | {metrics['metric/total_time']:.0f}s", flush=True)


LOSSES = (("policy loss", "policy_loss"), ("value loss", "value_loss"), ("entropy", "entropy"))
