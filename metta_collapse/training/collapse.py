"""The collapse in the embedded runtime: the recipe's `collapse` section and the train tool that acts on it.

The policy's `core` (feature box -> heads) is what the engine analyses and rewrites; the live operation itself
(`metta_collapse.live.collapse_live`) is shared with the Metta adapter."""

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

import metta_collapse as mc
from metta_collapse.live import PackedState, collapse_live
from metta_collapse.training.checkpoint import (
    checkpoint_epochs,
    load_checkpoint,
    policy_from_checkpoint,
    save_checkpoint,
)
from metta_collapse.training.config import Config, ConfigError, TrainTool
from metta_collapse.training.metrics import read_metrics
from metta_collapse.training.policy import FastPolicy

if TYPE_CHECKING:
    from metta_collapse.training.trainer import TrainerState

CORE_SPEC = mc.ModelSpec(
    inputs={"box": mc.InputSpec(axis=1), **{name: mc.InputSpec(role="state") for name in ("h1", "c1", "h2", "c2")}},
    outputs=["logits", "value", "state", "state", "state", "state"],
)
STATE_PARTS = {"lstm_h": ["h1", "h2"], "lstm_c": ["c1", "c2"]}
# segments of recent observations the collapse analyses and measures its effect on
ANALYSIS_SEGMENTS = 32
PRE_COLLAPSE_SUFFIX = ".precollapse"


def core_inputs(policy: FastPolicy, observations: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The core's inputs for (segments, horizon, tokens, 3) observations run from zero recurrent state; without
    observations, one empty box (colors depend on the weights only, never on the input values)."""
    device = policy.feature_scale.device
    if observations is None:
        box = torch.zeros(1, policy.core.cnn1.in_channels, policy.obs_height, policy.obs_width, device=device)
    else:
        box = policy.box(observations.reshape(-1, *observations.shape[2:]).to(device))
    segments = 1 if observations is None else observations.shape[0]
    zeros = [torch.zeros(segments, lstm.hidden_size, device=device) for lstm in (policy.core.lstm1, policy.core.lstm2)]
    return box, zeros[0], zeros[0], zeros[1], zeros[1]


def analyze_policy(
    policy: FastPolicy, config: mc.CollapseConfig, observations: torch.Tensor | None = None
) -> mc.CollapsePlan:
    return mc.analyze(policy.core, core_inputs(policy, observations), config, CORE_SPEC)


class CollapseSection(Config):
    """When and how to collapse (design.md); the thresholds and metric are the engine's."""

    enabled: bool = True
    epoch_idx: int = Field(default=10, ge=0)
    thresholds: mc.Thresholds = Field(default_factory=mc.Thresholds)
    metric: mc.config.Metric = "cosine"
    mode: Literal["fibration", "random_ablation", "scratch"] = "fibration"
    init_from: str | None = Field(default=None, pattern=r"^[\w.=+-]+$")
    optimizer_state: Literal["remap", "reset"] = "remap"
    recurrent_state: Literal["map", "reset"] = "map"
    seed: int = 0

    def engine_config(self) -> mc.CollapseConfig:
        return mc.CollapseConfig(thresholds=self.thresholds, metric=self.metric)

    def branch_name(self) -> str:
        """The study's names: {src}_epoch_{E}_{base|ablationsrandom|small_scratch}_{linear}_{cnn}_{lstm}_{critic}."""
        arm = {"fibration": "base", "random_ablation": "ablationsrandom", "scratch": "small_scratch"}[self.mode]
        t = self.thresholds
        return f"{self.init_from}_epoch_{self.epoch_idx}_{arm}_{t.linear}_{t.cnn}_{t.lstm}_{t.critic}"


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def collapse_metrics(record: dict) -> dict[str, float]:
    return {f"collapse/{key}": float(value) for key, value in record.items() if isinstance(value, int | float)}


def print_record(record: dict) -> None:
    kept = record["params_after"] / record["params_before"]
    print(
        f"collapse ({record['mode']}, {record['metric']}) at epoch {record['epoch']}, step {record['agent_step']:,}: "
        f"{record['params_before']:,} -> {record['params_after']:,} parameters ({kept:.1%} kept) in "
        f"{record['seconds']:.2f}s; KL mean {record['kl_mean']:.2e} max {record['kl_max']:.2e}, "
        f"value error {record['value_err']:.2e}"
    )
    for layer in record["layers"]:
        print(f"  {layer['name']:<20} {layer['width_before']:>6} -> {layer['width_after']:<6}")


class CollapseTrainTool(TrainTool):
    """The arena train tool plus a `collapse` section: trains, collapses the live policy at the first epoch
    >= `collapse.epoch_idx` (or branches from another run's checkpoint at that epoch), keeps training."""

    collapse: CollapseSection = Field(default_factory=CollapseSection)

    def invoke(self) -> int | None:
        c = self.collapse
        if c.mode == "scratch" and c.init_from is None:
            raise ConfigError("collapse.mode=scratch trains the small network from step 0: it needs collapse.init_from")
        if c.enabled and c.init_from is not None:
            source = self._source_checkpoint()
            if self.run is None:
                self.run = c.branch_name()
            if not self.checkpoint_dir.is_dir() or not checkpoint_epochs(self.checkpoint_dir, self.run):
                self._branch(source)
            else:
                self._check_same_branch()
        elif c.enabled:
            last = math.ceil(self.trainer.total_timesteps / self.trainer.batch_size)
            if c.epoch_idx > last:
                raise ConfigError(
                    f"collapse.epoch_idx={c.epoch_idx} is beyond this run's last epoch {last} "
                    f"(trainer.total_timesteps={self.trainer.total_timesteps} / trainer.batch_size="
                    f"{self.trainer.batch_size})"
                )
        return super().invoke()

    def _source_checkpoint(self) -> Path:
        c = self.collapse
        source_dir = Path(self.train_dir) / c.init_from / "checkpoints"
        if not source_dir.is_dir():
            train_dir = Path(self.train_dir)
            runs = (
                sorted(p.name for p in train_dir.iterdir() if (p / "checkpoints").is_dir())
                if train_dir.is_dir()
                else []
            )
            raise ConfigError(
                f"collapse.init_from={c.init_from!r}: no such run under {self.train_dir}; runs with checkpoints: "
                f"{', '.join(runs) or '(none)'}"
            )
        epochs = checkpoint_epochs(source_dir, c.init_from)
        if c.epoch_idx not in epochs:
            raise ConfigError(
                f"collapse.epoch_idx={c.epoch_idx}: run {c.init_from!r} has no checkpoint at that epoch; "
                f"its checkpoint epochs: {', '.join(map(str, sorted(epochs))) or '(none)'}"
            )
        return epochs[c.epoch_idx]

    def _branch(self, source: Path) -> None:
        """Start this run from the source run's checkpoint, collapsed (or cut, or re-initialised)."""
        c = self.collapse
        checkpoint = load_checkpoint(source)
        policy = policy_from_checkpoint(checkpoint)
        optimizer = self.make_optimizer(policy)
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        observations = self.recent_observations(policy)
        record = self.collapse_policy(policy, optimizer, observations, [])
        scratch = c.mode == "scratch"
        epoch, step, wall = (
            (0, 0, 0.0) if scratch else (checkpoint["epoch"], checkpoint["agent_step"], checkpoint["wall_time"])
        )
        record |= {"epoch": epoch, "agent_step": step, "source": c.init_from, "source_epoch": checkpoint["epoch"]}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        source_metrics = Path(self.train_dir) / c.init_from / "metrics.jsonl"
        if not scratch and source_metrics.exists():  # the branch shares the baseline's history up to the branch
            shared = [m for m in read_metrics(source_metrics) if m["metric/epoch"] <= epoch]
            (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in shared))
        save_checkpoint(self.checkpoint_dir, self.run, policy, optimizer, epoch, step, wall, extra={"collapse": record})
        write_json(self.run_dir / "collapse.json", record)
        print_record(record)

    def collapse_policy(
        self,
        policy: FastPolicy,
        optimizer: torch.optim.Optimizer,
        observations: torch.Tensor,
        buffers: list[PackedState],
    ) -> dict:
        c = self.collapse
        observations = observations.to(policy.feature_scale.device)
        _, record = collapse_live(
            policy,
            "core",
            core_inputs(policy, observations),
            CORE_SPEC,
            c.engine_config(),
            optimizer,
            buffers,
            lambda: policy(observations, {}),
            c.mode,
            c.seed,
            c.optimizer_state,
            c.recurrent_state,
        )
        return record | {"optimizer_state": c.optimizer_state, "recurrent_state": c.recurrent_state, "seed": c.seed}

    def _check_same_branch(self) -> None:
        """Resuming a branch must not silently continue one made with other settings under the same name."""
        c, path = self.collapse, self.run_dir / "collapse.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        wanted = {
            "mode": c.mode,
            "metric": c.metric,
            "thresholds": c.thresholds.model_dump(),
            "optimizer_state": c.optimizer_state,
            "recurrent_state": c.recurrent_state,
            "seed": c.seed,
        }
        differs = {key: record.get(key) for key, value in wanted.items() if record.get(key) != value}
        if differs:
            raise ConfigError(
                f"run {self.run!r} already exists as a branch with other collapse settings ({differs}); "
                "give this branch its own name with run=..."
            )

    def make_optimizer(self, policy: FastPolicy) -> torch.optim.Optimizer:
        """The optimizer PuffeRL builds (Adam with the tool's settings), to carry a checkpoint's state."""
        o = self.trainer.optimizer
        return torch.optim.Adam(policy.parameters(), lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)

    def recent_observations(self, policy: FastPolicy) -> torch.Tensor:
        """One BPTT segment per agent of the policy acting in the training environment: (agents, T, tokens, 3)."""
        from metta_collapse.training.arena import make_vecenv

        env_cfg = self.training_env.make_config()
        vecenv = make_vecenv(env_cfg, 1, self.seed)
        try:
            observations, _ = vecenv.reset(self.seed)
            state: dict = {}
            frames = []
            generator = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for _ in range(self.trainer.bptt_horizon):
                    tokens = torch.as_tensor(observations)
                    frames.append(tokens)
                    logits, _ = policy.forward_eval(tokens, state)
                    actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
                    observations, *_ = vecenv.step(actions.numpy())
        finally:
            vecenv.close()
        return torch.stack(frames, dim=1)

    def on_epoch_end(self, state: "TrainerState") -> None:
        c = self.collapse
        done = state.extra.get("collapse")
        if done is not None and "source" in done and state.epoch == done["epoch"] + 1:
            state.metrics.update(collapse_metrics(done))  # a branch's record reaches the tracker here
        if not c.enabled or done is not None or state.epoch < c.epoch_idx:
            return
        trainer = state.trainer
        pre_collapse = save_checkpoint(
            self.checkpoint_dir,
            self.run,
            state.policy,
            state.optimizer,
            state.epoch,
            state.agent_step,
            state.metrics["metric/total_time"],
            suffix=PRE_COLLAPSE_SUFFIX,
        )
        observations = state.observations[:ANALYSIS_SEGMENTS]
        policy = state.policy
        buffers = [
            PackedState(holder, key, STATE_PARTS[name])
            for name, holder in (("lstm_h", trainer.lstm_h), ("lstm_c", trainer.lstm_c))
            for key in holder
        ]
        try:
            record = self.collapse_policy(policy, state.optimizer, observations, buffers)
        except Exception as error:
            pre_collapse.unlink()
            raise RuntimeError(f"collapse at epoch {state.epoch} failed, nothing was changed: {error}") from error
        record |= {"epoch": state.epoch, "agent_step": state.agent_step}
        state.extra["collapse"] = record
        state.metrics.update(collapse_metrics(record))
        write_json(self.run_dir / "collapse.json", record)
        print_record(record)
