"""The embedded train tool: a pydantic model whose dotted paths mirror the September 2025 Metta TrainTool.

Every field is reachable by an override such as `trainer.checkpoint.checkpoint_interval=10`; values arrive as
strings and are validated by pydantic on assignment. Checks that involve several fields (batch size against
the number of agents, ...) run in `TrainTool.check`, after all overrides, before any environment starts.
"""

import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from metta_collapse.errors import ConfigError

if TYPE_CHECKING:
    from mettagrid.config.mettagrid_config import MettaGridConfig

    from metta_collapse.training.trainer import TrainerState


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerConfig(Config):
    type: Literal["adam"] = "adam"
    learning_rate: float = Field(default=0.000457, gt=0, le=1.0)
    beta1: float = Field(default=0.9, ge=0, le=1.0)
    beta2: float = Field(default=0.999, ge=0, le=1.0)
    eps: float = Field(default=1e-12, gt=0)


class VTraceConfig(Config):
    rho_clip: float = Field(default=1.0, gt=0)
    c_clip: float = Field(default=1.0, gt=0)


class PrioritizedExperienceReplayConfig(Config):
    prio_alpha: float = Field(default=0.0, ge=0, le=1.0)
    prio_beta0: float = Field(default=0.6, ge=0, le=1.0)


class PPOConfig(Config):
    clip_coef: float = Field(default=0.264407, gt=0, le=1.0)
    ent_coef: float = Field(default=0.01, ge=0)
    gae_lambda: float = Field(default=0.891477, ge=0, le=1.0)
    gamma: float = Field(default=0.977, ge=0, le=1.0)
    max_grad_norm: float = Field(default=0.5, gt=0)
    vf_clip_coef: float = Field(default=0.1, ge=0)
    vf_coef: float = Field(default=0.897619, ge=0)
    vtrace: VTraceConfig = Field(default_factory=VTraceConfig)
    prioritized_experience_replay: PrioritizedExperienceReplayConfig = Field(
        default_factory=PrioritizedExperienceReplayConfig
    )


class LossConfigs(Config):
    ppo: PPOConfig = Field(default_factory=PPOConfig)


class LossConfig(Config):
    loss_configs: LossConfigs = Field(default_factory=LossConfigs)


class CheckpointConfig(Config):
    # in epochs; 0 = only at the end
    checkpoint_interval: int = Field(default=50, ge=0)
    # in epochs; 0 = never upload checkpoints to wandb
    wandb_checkpoint_interval: int = Field(default=50, ge=0)
    # default: <train_dir>/<run>/checkpoints
    checkpoint_dir: str | None = None


class EvaluationConfig(Config):
    """Accepted for command-line compatibility with Metta; the embedded runtime has no evaluator."""

    evaluate_interval: int = Field(default=0, ge=0)
    evaluate_remote: bool = False
    evaluate_local: bool = True
    replay_dir: str | None = None
    skip_git_check: bool = False
    git_hash: str | None = None
    num_training_tasks: int = Field(default=1, ge=1)


class TrainerConfig(Config):
    total_timesteps: int = Field(default=50_000_000_000, gt=0)
    losses: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    # CPU-sized defaults; Metta's (524288 / 16384) assume GPUs
    batch_size: int = Field(default=24576, gt=0)
    minibatch_size: int = Field(default=4096, gt=0)
    bptt_horizon: int = Field(default=64, gt=0)
    update_epochs: int = Field(default=1, gt=0)
    # a collapse changes parameter shapes mid-training, which a compiled graph cannot follow
    compile: bool = False
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)


class TrainingEnvConfig(Config):
    arena: Literal["full", "small"] = "full"
    # copies of the arena stepped together; default: 24 agents in all (1 full arena, 4 small ones)
    num_envs: int | None = Field(default=None, gt=0)

    def make_config(self) -> "MettaGridConfig":
        from metta_collapse.training.arena import make_arena, make_small_arena  # mettagrid: not for configuration

        return make_arena() if self.arena == "full" else make_small_arena()

    def copies(self, agents_per_env: int) -> int:
        return self.num_envs or max(1, 24 // agents_per_env)


class PolicyArchitectureConfig(Config):
    name: Literal["fast"] = "fast"


class WandbConfig(Config):
    enabled: bool = True
    mode: Literal["offline", "online"] = "offline"
    project: str = "metta"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class Tool(Config):
    # the override paths the command line set (the runner fills it in): a branch keeps them over its source's
    _given: set[str] = PrivateAttr(default_factory=set)

    def invoke(self) -> int | None:
        raise NotImplementedError


class TrainTool(Tool):
    run: str | None = Field(default=None, pattern=r"^\w[\w.=+-]*$")
    train_dir: str = "train_dir"
    seed: int = Field(default=0, ge=0, lt=2**32)  # numpy's and the environments' seeds are 32-bit
    device: Literal["cpu", "cuda"] = "cpu"
    # torch intra-op threads while training. On 2 cores a second thread gains ~20% when the machine is idle
    # but stalls training up to 10x whenever another job runs, so one is the default.
    torch_threads: int = Field(default=1, ge=1)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    training_env: TrainingEnvConfig = Field(default_factory=TrainingEnvConfig)
    policy_architecture: PolicyArchitectureConfig = Field(default_factory=PolicyArchitectureConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train_dir) / self.run

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.trainer.checkpoint.checkpoint_dir or self.run_dir / "checkpoints")

    def check(self, num_agents: int, world: int = 1) -> None:
        """Cross-field checks for training `num_agents` agents in each of `world` processes; raises ConfigError."""
        import torch  # here: configuration alone does not need torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda, but torch sees no CUDA device here: use device=cpu")
        t = self.trainer
        if t.compile:
            raise ConfigError("trainer.compile=true is not supported: a collapse changes parameter shapes")
        if t.minibatch_size > t.batch_size or t.batch_size % t.minibatch_size:
            raise ConfigError(
                f"trainer.batch_size={t.batch_size} must be a multiple of trainer.minibatch_size={t.minibatch_size}"
            )
        # each of the `world` processes trains 1/world of the batch and of every minibatch
        across = f" x {world} processes (WORLD_SIZE)" if world > 1 else ""
        if t.minibatch_size % (t.bptt_horizon * world):
            raise ConfigError(
                f"trainer.minibatch_size={t.minibatch_size} must be a multiple of "
                f"trainer.bptt_horizon={t.bptt_horizon}{across}"
            )
        # PuffeRL fills the batch with whole bptt segments of every agent
        unit = t.bptt_horizon * num_agents * world
        if t.batch_size % unit:
            raise ConfigError(
                f"trainer.batch_size={t.batch_size} does not fit {num_agents} agents: it must be a multiple of "
                f"trainer.bptt_horizon x agents = {t.bptt_horizon} x {num_agents}{across} = {unit}"
            )
        ckpt = t.checkpoint
        if ckpt.wandb_checkpoint_interval and ckpt.wandb_checkpoint_interval < ckpt.checkpoint_interval:
            raise ConfigError(
                f"trainer.checkpoint.wandb_checkpoint_interval={ckpt.wandb_checkpoint_interval} "
                "must be at least "
                f"trainer.checkpoint.checkpoint_interval={ckpt.checkpoint_interval}"
            )

    def invoke(self) -> int | None:
        # imported here: the trainer pulls in torch and PuffeRL, which configuration alone does not need
        from metta_collapse.training.trainer import train

        self.start_processes()
        with run_lock(self.run_dir):
            if os.environ.get("RANK", "0") == "0":
                self.record_settings()
            train(self, on_epoch_end=self.on_epoch_end)
        return 0

    def record_settings(self) -> None:
        """Write the run's settings to `config.json`. Resumed with other settings than it last trained with, the
        run says which (the collapse's are checked against its record instead)."""
        path = self.run_dir / "config.json"
        now = flatten(self.model_dump(mode="json"))
        if path.exists():
            before = flatten(json.loads(path.read_text()))
            changed = [
                f"{key} {json.dumps(before.get(key))} -> {json.dumps(value)}"
                for key, value in now.items()
                if before.get(key) != value and not key.startswith("collapse.")
            ]
            if changed:
                print(f"{self.run} resumes with other settings than it last trained with: {', '.join(changed)}")
        write_json(path, self.model_dump(mode="json"))

    def start_processes(self) -> None:
        """Check the batch against this job's processes (torchrun's WORLD_SIZE) before any of them trains, join
        them, and give them one run name."""
        from metta_collapse.training import distributed

        env_cfg = self.training_env.make_config()
        agents = env_cfg.game.num_agents * self.training_env.copies(env_cfg.game.num_agents)
        self.check(agents, distributed.world_size())
        distributed.start(self.device)
        self.run = distributed.from_main(self.run or f"local.{datetime.now():%Y%m%d-%H%M%S}")

    def on_epoch_end(self, state: "TrainerState") -> None:
        """Called after every epoch with the trainer state; subclasses hook in here (e.g. a collapse)."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One training job per run: `run.lock` holds the pid of the process training it. Another live holder is
    refused; a holder that is gone (a killed run) is taken over with a warning. Re-entrant within a process.
    Under torchrun rank 0 holds it for the whole job."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder == os.getpid():
                yield
                return
            if holder is not None and _alive(holder):
                raise ConfigError(
                    f"run {run_dir.name!r} is being trained by process {holder} ({path}): one job per run"
                ) from None
            message = f"run {run_dir.name!r}: taking over the lock of process {holder}, which is gone"
            warnings.warn(message, stacklevel=3)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):  # a job refused before it wrote anything leaves no run behind
            run_dir.rmdir()


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # gone meanwhile, or torn
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as {dotted path: value}."""
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = value
    return flat


def json_text(payload: dict) -> str:
    """Indented JSON with each list of numbers on one line (a partition lists a layer's units)."""
    numbers = re.compile(r"\[[-+\d.eE,\s]*\]")
    return numbers.sub(
        lambda m: "[" + ", ".join(m.group()[1:-1].replace(",", " ").split()) + "]", json.dumps(payload, indent=2)
    )


def write_json(path: Path, payload: dict) -> None:
    """Written whole or not at all (a kill leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(payload))
    os.replace(tmp, path)


def apply_override(root: BaseModel, key: str, value: object) -> None:
    """Set the field at dotted path `key` from its command-line string (or a value), validated by pydantic."""
    *parents, leaf = key.split(".")
    target = root
    for depth, name in enumerate([*parents, leaf]):
        fields = type(target).model_fields if isinstance(target, BaseModel) else {}
        if name not in fields:
            where = ".".join(key.split(".")[:depth]) or "the tool"
            raise ConfigError(
                f"unknown override key {key!r}: {where} has no field {name!r}; valid keys there: "
                f"{', '.join(fields) or '(none)'}"
            )
        if depth < len(parents):
            target = getattr(target, name)
    try:
        setattr(target, leaf, value)
    except ValidationError as error:
        parsed = _parse_json(value)
        try:
            if parsed is None:
                raise error
            setattr(target, leaf, parsed)
        except ValidationError:
            raise ConfigError(f"invalid value for {key}: {value!r} ({error.errors()[0]['msg']})") from None


def field_lines(model: BaseModel, prefix: str = "") -> list[str]:
    """Every override path under `model` with its value, and its bounds or choices where it has any."""
    lines = []
    for name, info in type(model).model_fields.items():
        value, path = getattr(model, name), prefix + name
        if isinstance(value, BaseModel):
            lines += field_lines(value, path + ".")
            continue
        limits = [
            f"{symbol} {getattr(rule, attribute)}"
            for rule in info.metadata
            for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("pattern", "matching"))
            if getattr(rule, attribute, None) is not None
        ]
        if get_origin(info.annotation) is Literal:
            limits.append("one of " + ", ".join(map(str, get_args(info.annotation))))
        lines.append(f"{path} = {json.dumps(value, default=str)}" + (f"  ({'; '.join(limits)})" if limits else ""))
    return lines


def _parse_json(value: str) -> object | None:
    """Lists and dicts arrive as JSON text (`wandb.tags='["a","b"]'`)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list | dict) else None
