"""The collapse in the embedded runtime: the recipe's `collapse` section and the train tool that acts on it.

The policy's `core` (feature box -> heads) is what the engine analyses and rewrites; the live operation itself
(`metta_collapse.live.collapse_live`) is shared with the Metta adapter.

torch and the runtime's modules are imported where they are used: the recipe imports this module, and its
`--help` and argument errors need only the configuration."""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

import metta_collapse as mc
from metta_collapse.training.config import (
    Config,
    ConfigError,
    TrainTool,
    apply_override,
    flatten,
    json_text,
    run_lock,
    write_json,
)
from metta_collapse.training.metrics import read_metrics

if TYPE_CHECKING:
    import torch

    from metta_collapse.live import Data, PackedState
    from metta_collapse.training.policy import FastPolicy
    from metta_collapse.training.trainer import TrainerState

CORE_SPEC = mc.ModelSpec(
    inputs={"box": mc.InputSpec(axis=1), **{name: mc.InputSpec(role="state") for name in ("h1", "c1", "h2", "c2")}},
    outputs=["logits", "value", "state", "state", "state", "state"],
)
STATE_PARTS = {"lstm_h": ["h1", "h2"], "lstm_c": ["c1", "c2"]}
PRE_COLLAPSE_SUFFIX = ".precollapse"


def core_inputs(policy: FastPolicy, observations: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The core's inputs for (segments, horizon, tokens, 3) observations run from zero recurrent state; without
    observations, one empty box (colors depend on the weights only, never on the input values)."""
    import torch

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


def policy_data(
    policy: FastPolicy, fit: torch.Tensor, select: torch.Tensor, report: torch.Tensor, description: str
) -> Data:
    """The collapse's data from token observations (segments, steps, tokens, 3), each segment from zero state."""
    from metta_collapse.live import Data

    return Data(
        fit=core_inputs(policy, fit),
        report=lambda p, _: p(report, {}),
        select=core_inputs(policy, select),
        select_behaviour=lambda p, _: p(select, {}),
        description=description,
        example=core_inputs(policy),
    )


def collapse_copy(
    policy: FastPolicy,
    data: Data,
    config: mc.CollapseConfig,
    refit: bool,
    budget: mc.Budget | None = None,
    mode: str = "fibration",
    seed: int = 0,
) -> dict:
    """Collapse a copy of the policy (with a fresh optimizer), leaving the policy as it is; the record."""
    import torch

    from metta_collapse.live import collapse_live

    trial = copy.deepcopy(policy)
    optimizer = torch.optim.Adam(trial.parameters())
    _, record = collapse_live(
        trial, "core", data, CORE_SPEC, config, optimizer, [], mode, seed, refit_weights=refit, budget=budget
    )
    return record


class CollapseSection(Config):
    """When and how to collapse (design.md); the thresholds, rank_tol, metric and budget are the engine's."""

    enabled: bool = True
    epoch_idx: int = Field(default=10, ge=0)
    # sweep-only: epoch_idx = ⌊epoch_fraction × the run's epochs⌋ (rounded down to the checkpoint interval)
    epoch_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    metric: mc.config.Metric = "basis"
    thresholds: mc.Thresholds = Field(default_factory=mc.Thresholds)
    rank_tol: mc.RankTol = Field(default_factory=mc.RankTol)
    budget: mc.Budget = Field(default_factory=mc.Budget)
    refit: bool = True
    # agent steps of experience the units are chosen and the refit solved on (topped up with fresh rollouts)
    fit_steps: int = Field(default=6144, ge=1)
    # every this many epochs, log what a collapse would do now (symmetry/* metrics); 0: never
    symmetry_interval: int = Field(default=0, ge=0)
    mode: Literal["fibration", "random_ablation", "scratch"] = "fibration"
    init_from: str | None = Field(default=None, pattern=r"^\w[\w.=+-]*$")
    optimizer_state: Literal["remap", "reset"] = "remap"
    recurrent_state: Literal["map", "reset"] = "map"
    seed: int = 0
    # steps of the task evaluation after the cut (both policies on the same held-out maps, at most one episode;
    # 24 agents' worth of arena copies); 0: none
    eval_steps: int = Field(default=256, ge=0)

    def check(self) -> None:
        try:
            mc.config.check_section(self)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def engine_config(self) -> mc.CollapseConfig:
        return mc.CollapseConfig(thresholds=self.thresholds, metric=self.metric, rank_tol=self.rank_tol)

    def settings(self) -> dict:
        """Every field that shapes a branch or a collapse, its source run and epoch included (the resume check
        compares them); not the switches."""
        return self.model_dump(exclude={"enabled", "symmetry_interval", "eval_steps"})

    def branch_name(self) -> str:
        """The study's names, {src}_epoch_{E}_{base|ablationsrandom|small_scratch}_{linear}_{cnn}_{lstm}_{critic},
        with the metric when not cosine, `basis_` and the rank tolerances for the basis, `params…`/`kl…` for a
        budget in place of the knob (`macs…` likewise), and `_norefit` without the refit."""
        arm = {"fibration": "base", "random_ablation": "ablationsrandom", "scratch": "small_scratch"}[self.mode]
        budget = next(((name, value) for name, value in self.budget.model_dump().items() if value is not None), None)
        if budget is not None:
            knob = f"{budget[0]}{budget[1]}"
        else:
            values = (self.rank_tol if self.metric == "basis" else self.thresholds).model_dump().values()
            knob = "_".join(str(v) for v in values) if self.metric != "exact" else ""
        metric = "" if self.metric == "cosine" else self.metric
        name = "_".join(part for part in (arm, metric, knob) if part)
        return f"{self.init_from}_epoch_{self.epoch_idx}_{name}{'' if self.refit else '_norefit'}"


def held_out_seed(seed: int, epoch: int) -> int:
    """The seed of a run's held-out maps at an epoch (their streams keep them apart from training's maps)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def collapse_metrics(record: dict) -> dict[str, float]:
    return {f"collapse/{key}": float(value) for key, value in record.items() if isinstance(value, int | float)}


def print_record(record: dict) -> None:
    kept = record["params_after"] / record["params_before"]
    refit = ", refit" if record.get("refit") else ""
    print(
        f"collapse ({record['mode']}, {record['metric']}{refit}) at epoch {record['epoch']}, step "
        f"{record['agent_step']:,}: {record['params_before']:,} -> {record['params_after']:,} parameters "
        f"({kept:.1%} kept) in {record['seconds']:.2f}s\n"
        f"  per agent step: {record['macs_per_step_before']:,} -> {record['macs_per_step_after']:,} multiply-adds, "
        f"{record['seconds_per_step_before'] * 1e6:.1f} -> {record['seconds_per_step_after'] * 1e6:.1f} us"
    )
    if record["mode"] != "scratch":  # a network trained from scratch is compared with nothing it learned
        print(
            f"  what it changed, on the {record.get('measured_on', 'recent data')}:\n"
            f"    KL(old || new) of the action distribution, mean {record['kl_mean']:.2e}, max {record['kl_max']:.2e}\n"
            f"    value error max|v_new - v_old| / max|v_old| {record['value_err']:.2e}\n"
            f"    most likely action unchanged {record.get('top1', float('nan')):.1%}"
        )
    print(f"  {'layer':<20} {'units':>15} {'parameters':>21} {'multiply-adds/step':>23}")
    for layer in record["layers"]:
        if layer["width_after"] != layer["width_before"]:
            columns = [f"{layer['width_before']:>6} -> {layer['width_after']:<6}"]
            for key, width in (("params", 21), ("macs", 23)):
                if f"{key}_before" in layer:
                    columns.append(
                        f"{layer[f'{key}_before']:>{width // 2},} -> {layer[f'{key}_after']:<{width // 2 - 3},}"
                    )
            print(f"  {layer['name']:<20} " + " ".join(columns))


def print_evaluation(record: dict) -> None:
    per = "per episode" if record["eval_whole_episodes"] else f"in the first {record['eval_steps']} steps"
    print(
        f"  in the task, on {record['eval_maps']} held-out maps, the same for both as are the action draws, "
        f"{record['eval_steps']} steps each ({record['seconds_eval']:.2f}s):\n"
        f"    hearts per agent {per} {record['hearts_before']:.3f} -> {record['hearts_after']:.3f} (standard error "
        f"over {record['eval_agents']} agents {record['hearts_se_before']:.3f} -> {record['hearts_se_after']:.3f}), "
        f"reward per agent {record['reward_before']:.3f} -> {record['reward_after']:.3f}"
    )


class CollapseTrainTool(TrainTool):
    """The arena train tool plus a `collapse` section: trains, collapses the live policy at the first epoch
    >= `collapse.epoch_idx` (or branches from another run's checkpoint at that epoch), keeps training."""

    collapse: CollapseSection = Field(default_factory=CollapseSection)

    def invoke(self) -> int | None:
        from metta_collapse.training import distributed
        from metta_collapse.training.checkpoint import resume_checkpoint

        c = self.collapse
        c.check()
        if c.epoch_fraction is not None:
            epochs = math.ceil(self.trainer.total_timesteps / self.trainer.batch_size)
            c.epoch_idx = mc.config.epoch_at_fraction(
                c.epoch_fraction, epochs, self.trainer.checkpoint.checkpoint_interval
            )
        if not c.enabled and c.init_from is not None:
            raise ConfigError(
                f"collapse.init_from={c.init_from} branches with a collapse, but collapse.enabled=false: drop one"
            )
        if c.mode == "scratch" and c.init_from is None:
            raise ConfigError("collapse.mode=scratch trains the small network from step 0: it needs collapse.init_from")
        if c.init_from is not None and distributed.world_size() > 1:
            raise ConfigError(
                f"collapse.init_from={c.init_from} branches in one process: make the branch without torchrun "
                "(it trains on from its first checkpoint), then resume it with torchrun"
            )
        source = None
        if c.init_from is not None:
            source = self._source_checkpoint()
            self._inherit_settings()
            self.run = self.run or c.branch_name()
        elif c.enabled:
            last = math.ceil(self.trainer.total_timesteps / self.trainer.batch_size)
            if c.epoch_idx > last:
                raise ConfigError(
                    f"collapse.epoch_idx={c.epoch_idx} is beyond this run's last epoch {last} "
                    f"(trainer.total_timesteps={self.trainer.total_timesteps} / trainer.batch_size="
                    f"{self.trainer.batch_size})"
                )
        if not c.enabled or self.run is None:  # nothing to branch from or to check a resume against
            return super().invoke()
        self.start_processes()
        with run_lock(self.run_dir):  # a branch's first checkpoint is part of its job
            _, checkpoint = resume_checkpoint(self.checkpoint_dir, self.run)
            if source is not None and checkpoint is None:
                self._branch(source)  # a branch killed before its first readable checkpoint is made again
            else:
                self._check_resume(checkpoint)
            return super().invoke()

    def _source_checkpoint(self) -> Path:
        from metta_collapse.training.checkpoint import checkpoint_epochs

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

    def _inherit_settings(self) -> None:
        """A branch trains as its source run did: the source's settings (its `config.json`), those of this command
        line on top; not the run's name, folder or collapse."""
        c = self.collapse
        path = Path(self.train_dir) / c.init_from / "config.json"
        if not path.exists():
            warnings.warn(
                f"run {c.init_from!r} has no config.json: the branch trains with this command's settings", stacklevel=2
            )
            return
        own = ("run", "train_dir", "collapse", "trainer.checkpoint.checkpoint_dir")
        now, inherited = flatten(self.model_dump(mode="json")), []
        for key, value in flatten(json.loads(path.read_text())).items():
            if key.startswith(own) or key in self._given or now.get(key) == value:
                continue
            apply_override(self, key, value)
            inherited.append(f"{key}={json.dumps(value)}")
        if inherited:
            print(f"the branch takes the settings of run {c.init_from!r}: {', '.join(inherited)}")

    def _branch(self, source: Path) -> None:
        """Start this run from the source run's checkpoint, collapsed (or cut, or re-initialised)."""
        from metta_collapse.training.checkpoint import load_checkpoint, policy_from_checkpoint, save_checkpoint

        c = self.collapse
        checkpoint = load_checkpoint(source)
        print(f"branching {self.run} from {c.init_from} at its epoch {checkpoint['epoch']}, into {self.run_dir}")
        policy = policy_from_checkpoint(checkpoint)
        original = copy.deepcopy(policy)
        optimizer = self.make_optimizer(policy)
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        record = self.collapse_policy(policy, optimizer, policy_data(policy, *self.collapse_parts(policy, None)), [])
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
        write_json(self.run_dir / "collapse.json", record)
        print_record(record)
        self.record_evaluation(record, original, policy, epoch)
        save_checkpoint(
            self.checkpoint_dir,
            self.run,
            policy,
            optimizer,
            epoch,
            step,
            wall,
            extra={"collapse": record},
            arena=self.training_env.arena,
        )

    def record_evaluation(self, record: dict, original: FastPolicy, collapsed: FastPolicy, epoch: int) -> None:
        """Add the task evaluation to a written record (not for scratch: its network learned nothing yet)."""
        if not self.collapse.eval_steps or self.collapse.mode == "scratch":
            return
        record |= self.evaluate_in_task(original, collapsed, epoch)
        write_json(self.run_dir / "collapse.json", record)
        print_evaluation(record)

    def collapse_policy(
        self, policy: FastPolicy, optimizer: torch.optim.Optimizer, data: Data, buffers: list[PackedState]
    ) -> dict:
        from metta_collapse.live import collapse_live

        c = self.collapse
        _, record = collapse_live(
            policy,
            "core",
            data,
            CORE_SPEC,
            c.engine_config(),
            optimizer,
            buffers,
            c.mode,
            c.seed,
            c.optimizer_state,
            c.recurrent_state,
            refit_weights=c.refit,
            budget=c.budget,
        )
        return record | {"settings": c.settings()}

    def collapse_parts(
        self, policy: FastPolicy, observations: torch.Tensor | None, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """The fit, select and report parts, and what they are. Fit: the epoch's experience where there is one
        (the data the policy trains on), topped up to `collapse.fit_steps` with fresh rollouts on held-out fit
        maps; select and report: fresh rollouts on held-out maps of their own, never met in training."""
        import torch

        c, horizon = self.collapse, self.trainer.bptt_horizon
        device = policy.feature_scale.device
        seed = held_out_seed(self.seed, epoch)
        select, report = (self.rollout_segments(policy, 2, seed, stream) for stream in ("select", "report"))
        fit = [] if observations is None else [observations]
        missing = c.fit_steps - (0 if observations is None else observations.shape[0] * horizon)
        if missing > 0:
            steps_per_copy = self.rollout_steps() * self.training_env.make_config().game.num_agents
            fit.append(self.rollout_segments(policy, math.ceil(missing / steps_per_copy), seed, "fit"))
        fit_observations = torch.cat([f.to(device) for f in fit])
        where = "rollouts on held-out fit maps" if observations is None else f"epoch {epoch}'s experience"
        where += ", topped up by rollouts on held-out fit maps" if observations is not None and missing > 0 else ""
        description = (
            f"report part: {report.shape[0] * report.shape[1]:,} agent steps on held-out maps (fit part: "
            f"{fit_observations.shape[0] * horizon:,} agent steps of {where}; segments of {horizon} from zero state)"
        )
        return fit_observations, select.to(device), report.to(device), description

    def evaluate_in_task(self, original: FastPolicy, collapsed: FastPolicy, epoch: int) -> dict:
        """Hearts and reward per agent of the original and the collapsed policy on the same held-out maps, with the
        same random numbers for their actions: `collapse.eval_steps` steps, at most one episode, of enough arena
        copies for 24 agents. Timed (`seconds_eval`) apart from the collapse."""
        from metta_collapse.training.rollout import rollouts

        start = time.perf_counter()
        env_cfg = self.training_env.make_config()
        steps = min(self.collapse.eval_steps, env_cfg.game.max_steps)
        copies = math.ceil(24 / env_cfg.game.num_agents)
        seed = held_out_seed(self.seed, epoch)
        result: dict = {
            "eval_steps": steps,
            "eval_maps": copies,
            "eval_whole_episodes": steps == env_cfg.game.max_steps,
        }
        for name, policy in (("before", original), ("after", collapsed)):
            outcome = rollouts(policy, env_cfg, copies, steps, seed, "evaluate")[2]
            hearts = outcome["hearts"]
            result |= {
                f"hearts_{name}": hearts.mean().item(),
                f"hearts_se_{name}": (hearts.std() / len(hearts) ** 0.5).item(),
                f"reward_{name}": outcome["reward"].mean().item(),
            }
        return result | {"eval_agents": len(hearts), "seconds_eval": time.perf_counter() - start}

    def rollout_steps(self) -> int:
        """Steps of a fresh rollout: a quarter of `collapse.fit_steps` per copy (the fit part spans at least 4
        maps), whole segments."""
        horizon, agents = self.trainer.bptt_horizon, self.training_env.make_config().game.num_agents
        return math.ceil(self.collapse.fit_steps / 4 / agents / horizon) * horizon

    def rollout_segments(self, policy: FastPolicy, copies: int, seed: int, stream: str) -> torch.Tensor:
        """Fresh rollouts of `copies` environment copies on held-out maps of `stream`, as (segments, horizon, ...)."""
        from metta_collapse.training.rollout import rollouts

        env_cfg = self.training_env.make_config()
        observations, *_ = rollouts(policy, env_cfg, copies, self.rollout_steps(), seed, stream)
        return observations.reshape(-1, self.trainer.bptt_horizon, *observations.shape[2:])

    def _check_resume(self, checkpoint: dict | None) -> None:
        """A run that has collapsed resumes only with the collapse settings it was made with. The record in the
        checkpoint it resumes from decides; `collapse.json` is rewritten from it where a kill left it missing or
        from a collapse that no checkpoint holds."""
        from metta_collapse.training import distributed

        record = (checkpoint or {}).get("extra", {}).get("collapse")
        written = self.run_dir / "collapse.json"
        if record is None:
            if written.exists() and distributed.is_main():
                warnings.warn(
                    f"{written} records a collapse that no checkpoint holds (the run was killed before saving it): "
                    "removed; the collapse runs again",
                    stacklevel=2,
                )
                written.unlink()
            return
        made, now = record.get("settings", {}), self.collapse.settings()
        differs = [f"collapse.{key}={made[key]}" for key in made if key in now and made[key] != now[key]]
        if differs:
            raise ConfigError(
                f"run {self.run!r} was collapsed with other collapse settings ({', '.join(differs)}): resume it "
                "with those, or give this run its own name with run=..."
            )
        if distributed.is_main() and (not written.exists() or written.read_text() != json_text(record)):
            write_json(written, record)

    def make_optimizer(self, policy: FastPolicy) -> torch.optim.Optimizer:
        """The optimizer PuffeRL builds (Adam with the tool's settings), to carry a checkpoint's state."""
        import torch

        o = self.trainer.optimizer
        return torch.optim.Adam(policy.parameters(), lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)

    def epoch_data(self, state: TrainerState) -> Data:
        """The collapse's data from this epoch's experience; under torchrun, rank 0's on every rank."""
        from metta_collapse.training import distributed

        parts = None
        if distributed.is_main():
            parts = self.collapse_parts(state.policy, state.observations, state.epoch)
        return policy_data(state.policy, *distributed.from_main(parts))

    def log_symmetry(self, state: TrainerState) -> None:
        """What a collapse with these settings would do now, on a copy of the policy: `symmetry/kept` (the
        fraction of parameters at the knob or budget.kl), `symmetry/kl_mean`, `symmetry/value_err` (what it
        would cost, e.g. at budget.params), measured on the report part."""
        c = self.collapse
        record = collapse_copy(state.policy, self.epoch_data(state), c.engine_config(), c.refit, c.budget)
        kept = record["params_after"] / record["params_before"]
        state.metrics.update(
            {"symmetry/kept": kept, **{f"symmetry/{k}": record[k] for k in ("kl_mean", "value_err", "top1")}}
        )

    def on_epoch_end(self, state: TrainerState) -> None:
        from metta_collapse.live import PackedState, collapse_replicas
        from metta_collapse.training import distributed
        from metta_collapse.training.checkpoint import save_checkpoint

        c = self.collapse
        done = state.extra.get("collapse")
        if done is not None and "source" in done and state.epoch == done["epoch"] + 1:
            state.metrics.update(collapse_metrics(done))  # a branch's record reaches the tracker here
        if c.symmetry_interval and state.epoch % c.symmetry_interval == 0:
            self.log_symmetry(state)
        if not c.enabled or done is not None or "collapse_failed" in state.extra or state.epoch < c.epoch_idx:
            return
        trainer, main = state.trainer, distributed.is_main()
        if main:
            pre_collapse = save_checkpoint(
                self.checkpoint_dir,
                self.run,
                state.policy,
                state.optimizer,
                state.epoch,
                state.agent_step,
                state.metrics["metric/total_time"],
                suffix=PRE_COLLAPSE_SUFFIX,
                arena=self.training_env.arena,
            )
        policy = state.policy
        original = copy.deepcopy(policy) if main else None
        data = self.epoch_data(state)
        buffers = [
            PackedState(holder, key, STATE_PARTS[name])
            for name, holder in (("lstm_h", trainer.lstm_h), ("lstm_c", trainer.lstm_c))
            for key in holder
        ]
        policy, record, errors, _ = collapse_replicas(
            policy,
            state.optimizer,
            buffers,
            state.world > 1,
            lambda: self.collapse_policy(policy, state.optimizer, data, buffers),
        )
        state.train_policy(policy)  # on every rank together: a new replica wrapper is a collective
        if errors:
            self.record_failure(state, "; ".join(errors), pre_collapse if main else None)
            return
        record |= {"epoch": state.epoch, "agent_step": state.agent_step}
        state.extra["collapse"] = record
        state.checkpoint = True  # a kill before the next checkpoint would otherwise redo the collapse on new data
        if main:
            write_json(self.run_dir / "collapse.json", record)
            print_record(record)
            self.record_evaluation(record, original, policy, state.epoch)
        state.metrics.update(collapse_metrics(record))

    def record_failure(self, state: TrainerState, error: str, pre_collapse: Path | None) -> None:
        """A failed collapse, undone on every replica: recorded, checkpointed (no retry); training goes on."""
        failure = {"epoch": state.epoch, "agent_step": state.agent_step, "error": error}
        state.extra["collapse_failed"] = failure
        state.checkpoint = True
        state.metrics["collapse/failed"] = 1.0
        if pre_collapse is not None:
            pre_collapse.unlink()
            write_json(self.run_dir / "collapse_failed.json", failure)
            print(f"COLLAPSE FAILED at epoch {state.epoch}, nothing was changed; training goes on uncollapsed: {error}")
