"""The collapse inside a Metta checkout (docs/metta.md), in both of Metta's eras.

Metta is imported lazily: without it this module still imports, and everything that does not subclass a Metta
class — era detection, the layer chains of Metta's `fast` policy, the collapse of a live agent and the hook
logic — runs on any torch module with the same layer names. The live operation is `collapse_live`; this file
only describes Metta's policy to it and wires it into Metta's trainer.
"""

import functools
import importlib.util
import logging
import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, create_model
from torch import fx, nn

import metta_collapse as mc
from metta_collapse.activations import collapsed_inputs
from metta_collapse.live import Data, collapse_live
from metta_collapse.rewrite import map_collapsed, map_selected

Era = Literal["current", "september"]
# set on the agent after a collapse; September checkpoints pickle the agent, so a resumed run sees it
MARKER = "metta_collapse_record"
LEAD_EPOCHS = 2  # rollouts are recorded from this many epochs before epoch_idx
STATES = ("h", "c")  # the chain's recurrent-state inputs: (layers, rows, hidden)
log = logging.getLogger(__name__)
S = mc.Step


def detect_era() -> Era | None:
    """`current` (trainer components, a8d1ece), `september` (losses, b712df1), or None without Metta."""
    for era, module in (("current", "metta.rl.training.component"), ("september", "metta.rl.loss.base_loss")):
        try:
            if importlib.util.find_spec(module) is not None:
                return era
        except ImportError:  # no `metta`, or the unrelated PyPI package of that name
            continue
    return None


# ----- the `collapse` section, declared on Metta's Config base


def section_fields(knobs: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The section's fields; the embedded runtime's `CollapseSection` has the same names, types and defaults.
    `knobs` holds the thresholds, rank_tol and budget classes. Branching (`init_from`) and the scratch null
    model need a restart from a checkpoint: embedded only."""
    return {
        "enabled": (bool, True),
        "epoch_idx": (int, Field(default=10, ge=0)),
        # sweep-only: epoch_idx = ⌊epoch_fraction × the run's epochs⌋, so that every trial collapses
        "epoch_fraction": (float | None, Field(default=None, gt=0.0, lt=1.0)),
        "metric": (mc.config.Metric, "basis"),
        **{name: (cls, Field(default_factory=cls)) for name, cls in knobs.items()},
        "refit": (bool, True),
        "fit_steps": (int, Field(default=6144, ge=1)),
        "mode": (Literal["fibration", "random_ablation"], "fibration"),
        "optimizer_state": (Literal["remap", "reset"], "remap"),
        # current era: shrink the Cortex core too (the policy then needs this project to load), or keep Metta's classes
        "core": (Literal["shrink", "stock"], "shrink"),
        "seed": (int, 0),
    }


def section_class(base: type[BaseModel]) -> type[BaseModel]:
    """`CollapseSection` on `base`: Metta's override walker only enters Metta `Config` objects."""
    knobs = {
        name: create_model(
            f"Collapse{engine.__name__}",
            __base__=base,
            **{field: (f.annotation, f) for field, f in engine.model_fields.items()},
        )
        for name, engine in (("thresholds", mc.Thresholds), ("rank_tol", mc.RankTol), ("budget", mc.Budget))
    }
    return create_model("CollapseSection", __base__=base, **section_fields(knobs))


@functools.cache
def metta_section_class() -> type[BaseModel]:
    if detect_era() == "current":
        from mettagrid.base_config import Config
    else:
        from metta.mettagrid.config import Config
    return section_class(Config)


def engine_config(section: BaseModel) -> mc.CollapseConfig:
    return mc.CollapseConfig(
        thresholds=mc.Thresholds(**section.thresholds.model_dump()),
        rank_tol=mc.RankTol(**section.rank_tol.model_dump()),
        metric=section.metric,
    )


# ----- Metta's `fast` policies: layer chains, entries, and what each keeps beside its parameters


def _encoder_steps(layer: Callable[[str], str]) -> list[S]:
    """box -> cnn1 -> cnn2 -> flatten -> fc1 -> encoded_obs, a ReLU after each: the same in every `fast`."""
    return [
        S(layer("cnn1"), ("box",)),
        S(torch.relu, name="x1"),
        S(layer("cnn2"), ("x1",)),
        S(torch.relu, name="x2"),
        S(torch.flatten, ("x2", 1), name="flat"),
        S(layer("fc1"), ("flat",)),
        S(torch.relu, name="x3"),
        S(layer("encoded_obs"), ("x3",)),
        S(torch.relu, name="encoded"),
    ]


def _lstm_steps(lstm: str, time_axis: int = 0) -> list[S]:
    """One step of an LSTM from the given state (h, c), its sequence axis `time_axis` (1: batch first)."""
    return [
        S(torch.unsqueeze, ("encoded", time_axis), name="seq"),
        S(lstm, ("seq", ("h", "c")), name="l"),
        S(operator.getitem, ("l", 0), name="o"),
        S(operator.getitem, ("l", 1), name="s"),
        S(operator.getitem, ("s", 0), name="h_n"),
        S(operator.getitem, ("s", 1), name="c_n"),
        S(torch.squeeze, ("o", time_axis), name="hidden"),
    ]


def _current_heads(core: str) -> list[S]:
    return [
        S("actor_1.module", (core,)),
        S(torch.relu, name="actor"),
        S("actor_logits.module", ("actor",), name="logits"),
        S("critic_1.module", (core,)),
        S(torch.tanh, name="critic"),
        S("value_head.module", ("critic",), name="value"),
        S("gtd_aux.module", ("critic",), name="h_value"),
    ]


def current_fast_chain(root: nn.Module) -> fx.GraphModule:
    """`FastPolicy` (a8d1ece, agent/src/metta/agent/policies/fast.py) with `collapse.core=stock`: the CNN encoder
    from the normalised box, and the heads from the Cortex core's output; the core keeps its width."""
    steps = _encoder_steps(lambda name: f"cnn_encoder.{name}") + _current_heads("core")
    return mc.chain_graph(root, ["box", "core"], steps, ["logits", "value", "h_value", "encoded"])


# the LSTM of the `fast` policy's Cortex core: one column of one pass-through LSTM expert
CORTEX_LSTM = "core.stack.blocks.0.experts.0.cell.net"


def current_core_chain(root: nn.Module) -> fx.GraphModule:
    """`FastPolicy` with `collapse.core=shrink`: the encoder, one step of the core's (batch-first) LSTM from its
    state (h, c) at the call, and the heads (`cortex_core` builds the policy narrower than its input)."""
    steps = _encoder_steps(lambda name: f"cnn_encoder.{name}") + _lstm_steps(CORTEX_LSTM, 1)
    steps += _current_heads("hidden")
    return mc.chain_graph(root, ["box", "h", "c"], steps, ["logits", "value", "h_value", "h_n", "c_n"])


def narrow_core(root: nn.Module, plan: mc.CollapsePlan) -> None:
    """After the core's LSTM shrank in place: its cell's width, and the core's stored per-environment states
    (rows, layers, hidden), mapped like the LSTM's state."""
    lstm = root.get_submodule(CORTEX_LSTM)
    cell = root.get_submodule(CORTEX_LSTM.rpartition(".")[0])
    cell.hidden_size = lstm.hidden_size
    cell.cfg = cell.cfg.model_copy(update={"hidden_size": lstm.hidden_size})
    core = root.core
    core.d_hidden = lstm.input_size  # the encoder's width: the core's zero-input step that makes its state

    def mapped(leaf: torch.Tensor) -> torch.Tensor:
        return mc.map_state(plan, "h", leaf.movedim(1, 0), plan.kept).movedim(0, 1)

    core._rollout_store_leaves = [mapped(leaf) for leaf in core._rollout_store_leaves]
    core._row_store_leaves = [mapped(leaf) for leaf in core._row_store_leaves]
    if core._rollout_current_state is not None:
        core._rollout_current_state = core._rollout_current_state.apply(mapped)
    core._leaf_shapes = [(*shape[:-1], lstm.hidden_size) for shape in core._leaf_shapes]


def component_fast_chain(root: nn.Module) -> fx.GraphModule:
    """`fast` (b712df1, agent/src/metta/agent/component_policies/fast.py; the study's policy): layers under
    `components`, each weight layer at `_net.0` before its nonlinearity (`_net` without one), the 2-layer LSTM
    at `_core_._net`. actor_query's W (hidden, embed) is a 2-d contraction, so actor_1 collapses too."""
    steps = _encoder_steps(lambda name: f"components.{name}._net.0") + _lstm_steps("components._core_._net")
    steps += [
        S("components.critic_1._net.0", ("hidden",)),
        S(torch.tanh, name="critic"),
        S("components._value_._net", ("critic",), name="value"),
        S("components.actor_1._net.0", ("hidden",)),
        S(torch.relu, name="actor"),
        S("components.actor_query.W", name="W"),
        S(torch.einsum, ("b h, h e -> b e", "actor", "W")),
        S(torch.tanh, name="query"),
    ]
    return mc.chain_graph(root, ["box", "h", "c"], steps, ["query", "value", "h_n", "c_n"])


def pytorch_fast_chain(root: nn.Module) -> fx.GraphModule:
    """`pytorch/fast` (b712df1, agent/src/metta/agent/pytorch/fast.py): the encoder under `policy`, the 2-layer
    LSTM of its wrapper, the critic and actor_1. actor_1 feeds the bilinear action head (actor_W is 3-d, which
    the engine does not rewrite), so it keeps its width."""
    steps = _encoder_steps(lambda name: f"policy.{name}") + _lstm_steps("lstm")
    steps += [
        S("policy.critic_1", ("hidden",)),
        S(torch.tanh, name="critic"),
        S("policy.value_head", ("critic",), name="value"),
        S("policy.actor_1", ("hidden",)),
        S(torch.relu, name="actor"),
    ]
    return mc.chain_graph(root, ["box", "h", "c"], steps, ["actor", "value", "h_n", "c_n"])


def component_logits(root: nn.Module, query: torch.Tensor) -> torch.Tensor:
    """The component `fast`'s action logits from its query: scores against the active action embeddings."""
    embeddings = root.get_submodule("components._action_embeds_")
    active = embeddings.active_indices
    keys = embeddings._net(active) if active.numel() else embeddings._net.weight
    return query @ keys.T + root.get_submodule("components._action_").bias


def pytorch_logits(root: nn.Module, actor: torch.Tensor) -> torch.Tensor:
    """`pytorch/fast`'s action logits from actor_1's features: its bilinear head (one output, K = 1)."""
    policy = root.get_submodule("policy")
    keys = policy.action_embeddings.weight[: policy.num_active_actions]
    query = torch.tanh(torch.einsum("n h, k h e -> n k e", actor, policy.actor_W))[:, 0]
    return query @ keys.T + policy.actor_bias


def sync_param_layers(root: nn.Module, plan: mc.CollapsePlan) -> None:
    """Component layers keep `weight_net` (their weight layer, outside the module tree) and `initial_weights`
    (the L2-init anchor, a copy of the initial weights): point the first at the new layer, map the second
    like the weight it anchors."""
    for name, layer in root.named_modules():
        if "weight_net" not in vars(layer):
            continue
        net = layer._net[0] if isinstance(layer._net, nn.Sequential) else layer._net
        vars(layer)["weight_net"] = net
        weight = plan.params.get(f"{name}._net{'.0' if net is not layer._net else ''}.weight")
        if weight is not None and getattr(layer, "initial_weights", None) is not None:
            anchor = layer.initial_weights
            layer.initial_weights = (
                map_selected(anchor, weight.axes, plan.kept, plan.fold)
                if plan.kept is not None
                else map_collapsed(anchor, weight.axes, "weight")
            )


@dataclass(frozen=True)
class FastLayout:
    """One of Metta's `fast` policies as the adapter sees it."""

    name: str  # as Metta's configuration selects it
    era: Era
    chain: Callable[[nn.Module], fx.GraphModule]
    spec: mc.ModelSpec
    entries: dict[str, str]  # chain input -> the layer it enters, read during the trainer's own forward passes
    lstm: str | None = None  # the recurrent layer; its parent keeps hidden_size, num_layers and the memory
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # from the chain's first output
    after_rewrite: Callable[[nn.Module, mc.CollapsePlan], None] | None = None


SEPTEMBER_SPEC = mc.ModelSpec(
    inputs={"h": mc.InputSpec(role="state"), "c": mc.InputSpec(role="state")},
    outputs=["features", "value", "state", "state"],
)
LAYOUTS = [
    FastLayout(
        "fast (FastConfig, collapse.core=shrink)",
        "current",
        current_core_chain,
        mc.ModelSpec(
            inputs={"h": mc.InputSpec(role="state"), "c": mc.InputSpec(role="state")},
            outputs=["logits", "value", "value", "state", "state"],
        ),
        {"box": "cnn_encoder.cnn1"},
        lstm=CORTEX_LSTM,
        after_rewrite=narrow_core,
    ),
    FastLayout(
        "fast (FastConfig, collapse.core=stock)",
        "current",
        current_fast_chain,
        mc.ModelSpec(outputs=["logits", "value", "value", "features"]),
        {"box": "cnn_encoder.cnn1", "core": "actor_1.module"},
    ),
    FastLayout(
        "fast (policy_architecture.name=fast)",
        "september",
        component_fast_chain,
        SEPTEMBER_SPEC,
        {"box": "components.cnn1._net.0"},
        lstm="components._core_._net",
        logits=component_logits,
        after_rewrite=sync_param_layers,
    ),
    FastLayout(
        "pytorch/fast (policy_architecture.name=pytorch/fast)",
        "september",
        pytorch_fast_chain,
        SEPTEMBER_SPEC,
        {"box": "policy.cnn1"},
        lstm="lstm",
        logits=pytorch_logits,
    ),
]


def find_fast(agent: nn.Module, era: Era, core: str = "shrink") -> tuple[str, FastLayout]:
    """Qualified name of the `fast` policy inside Metta's agent ('' when the agent is it), and its layout;
    current era: with its Cortex core in the chain (`core=shrink`) or as the chain's input (`stock`)."""
    layouts = [
        layout
        for layout in LAYOUTS
        if layout.era == era and (era != "current" or (layout.lstm is not None) == (core == "shrink"))
    ]
    for name, module in agent.named_modules():
        for layout in layouts:
            paths = [*layout.entries.values(), *([layout.lstm] if layout.lstm else [])]
            if all(_has(module, path) for path in paths):
                return name, layout
    known = " or ".join(layout.name for layout in layouts)
    raise mc.CollapseError(f"the agent ({type(agent).__name__}) holds no {known} policy, the ones the adapter knows")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class Rollouts:
    """The chain's inputs in the trainer's rollout forward passes (those run without gradients; a training pass
    over sequences is skipped), copied and split by environment copy into the parts of a collapse's data: copies
    cycle through fit, fit, select, report, and each part keeps its latest rows, `fit_steps` for fit and half
    as many for select and report. The agents of one environment copy are `agents_per_env` consecutive rows of
    a forward pass; with fewer than 4 copies in a pass, its rows are split agent by agent instead. An LSTM's
    state (h, c) is read where the policy calls it."""

    CYCLE = ("fit", "fit", "select", "report")

    def __init__(self, layout: FastLayout, fit_steps: int, agents_per_env: int = 1):
        self.names = [*layout.entries, *(STATES if layout.lstm else ())]
        self.sizes = {"fit": fit_steps, "select": max(1, fit_steps // 2), "report": max(1, fit_steps // 2)}
        self.agents_per_env = max(1, agents_per_env)
        self.parts: dict[str, list[dict[str, torch.Tensor]]] = {part: [] for part in self.sizes}
        self.counts = dict.fromkeys(self.sizes, 0)
        self.by_agent = False  # some pass held fewer than 4 environment copies
        self.step: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def watch(self, root: nn.Module, layout: FastLayout) -> None:
        if self.handles:
            return
        for name, path in layout.entries.items():
            hook = functools.partial(self._entry, name)
            self.handles.append(root.get_submodule(path).register_forward_pre_hook(hook))
        if layout.lstm is not None:
            self.handles.append(root.get_submodule(layout.lstm).register_forward_pre_hook(self._state))

    def unwatch(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.step = [], {}

    def _entry(self, name: str, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            self.step[name] = args[0].detach()  # a view: `add`, later in the same pass, copies the rows it keeps
            self._complete()

    def _state(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            return
        x, batch_first = args[0], getattr(module, "batch_first", False)
        if x.ndim != 3 or x.shape[1 if batch_first else 0] != 1:  # a sequence, not one rollout step
            self.step = {}
            return
        rows = x.shape[0 if batch_first else 1]
        state = args[1] if len(args) > 1 and args[1] is not None else None
        if state is None:
            zeros = x.new_zeros(module.num_layers, rows, module.hidden_size)
            state = (zeros, zeros)
        self.step |= dict(zip(STATES, (state[0].detach(), state[1].detach()), strict=True))
        self._complete()

    def _complete(self) -> None:
        if set(self.step) == set(self.names):
            step, self.step = self.step, {}
            self.add(step)

    def add(self, step: dict[str, torch.Tensor]) -> None:
        """Split one rollout forward pass's inputs (chain input name -> rows; h and c: layers x rows) into the
        parts, kept rows first."""
        step = {name: t.movedim(1, 0) if name in STATES else t for name, t in step.items()}
        rows = step[self.names[0]].shape[0]
        if any(t.shape[0] != rows for t in step.values()):
            return  # entries of different passes
        copies = -(-rows // self.agents_per_env)
        unit = self.agents_per_env if copies >= len(self.CYCLE) else 1
        self.by_agent |= unit == 1 and self.agents_per_env > 1
        slot = torch.arange(rows) // unit % len(self.CYCLE)  # on the CPU: no device sync in the rollout
        for part, size in self.sizes.items():
            index = torch.nonzero(sum(slot == k for k, name in enumerate(self.CYCLE) if name == part)).squeeze(1)
            if not len(index):
                continue
            chunks = self.parts[part]
            chunks.append({name: t[index.to(t.device)] for name, t in step.items()})
            self.counts[part] += len(index)
            while self.counts[part] - len(chunks[0][self.names[0]]) >= size:
                self.counts[part] -= len(chunks.pop(0)[self.names[0]])

    def ready(self) -> bool:
        return all(self.counts[part] >= size for part, size in self.sizes.items())

    def inputs(self, part: str) -> tuple[torch.Tensor, ...]:
        """The chain's inputs from the part's latest rows."""
        chunks, size = self.parts[part], self.sizes[part]
        rows = {name: torch.cat([chunk[name] for chunk in chunks])[-size:] for name in self.names}
        return tuple(t.movedim(0, 1) if name in STATES else t for name, t in rows.items())

    def describe(self) -> str:
        split = "agent" if self.by_agent else "environment copy"
        counts = ", ".join(f"{part} {min(self.counts[part], size):,}" for part, size in self.sizes.items())
        return f"rows of the trainer's rollout forward passes split by {split} ({counts}); report part measured"


def collapse_agent(
    agent: nn.Module,
    optimizer: torch.optim.Optimizer,
    era: Era,
    section: BaseModel,
    rollouts: Rollouts,
) -> dict:
    """Collapse Metta's `fast` policy inside `agent` in place, with its optimizer; all or nothing.

    The units are chosen and the refit solved on the fit part of `rollouts`, a budget judged on the select
    part; the record's KL, value error and top-1 agreement come from the report part, each policy's own action
    head applied to the chain's first output."""
    prefix, layout = find_fast(agent, era, section.core)
    root = agent.get_submodule(prefix)
    chain = layout.chain(root)
    view = nn.Module()
    view.agent = agent  # collapse_live's transaction then restores every module of the agent on failure
    view.chain = chain

    def after_rewrite(plan: mc.CollapsePlan) -> None:
        if layout.lstm is not None:
            # a 2-layer LSTM split into a stack is replaced in the chain only: install it in the policy
            lstm = chain.get_submodule(layout.lstm)
            parent_name, _, attribute = layout.lstm.rpartition(".")
            holder = root.get_submodule(parent_name)
            setattr(holder, attribute, lstm)
            if era == "september":  # Metta's LSTM wrapper
                holder.hidden_size, holder.num_layers = lstm.hidden_size, lstm.num_layers
                holder.reset_memory()  # per-environment states have the old widths
        if layout.after_rewrite is not None:
            layout.after_rewrite(root, plan)

    def behaviour(inputs: tuple) -> Callable:
        def run(policy: nn.Module, plan: mc.CollapsePlan | None) -> tuple[torch.Tensor, torch.Tensor]:
            args = inputs if plan is None else collapsed_inputs(policy.chain, plan, inputs)
            outputs = policy.chain(*args)
            head = policy.agent.get_submodule(prefix)
            return (outputs[0] if layout.logits is None else layout.logits(head, outputs[0])), outputs[1]

        return run

    select = rollouts.inputs("select")
    data = Data(
        fit=rollouts.inputs("fit"),
        report=behaviour(rollouts.inputs("report")),
        select=select,
        select_behaviour=behaviour(select),
        description=rollouts.describe(),
    )
    _, record = collapse_live(
        view,
        "chain",
        data,
        layout.spec,
        engine_config(section),
        optimizer,
        [],
        section.mode,
        section.seed,
        section.optimizer_state,
        after_rewrite=after_rewrite,
        refit_weights=section.refit,
        budget=mc.Budget(**section.budget.model_dump()),
    )
    return record


class CollapseFailed(RuntimeError):
    """Raised after a failed collapse; Metta's trainer only logs component exceptions, so it is also logged."""


class CollapseHook:
    """The adapter's logic, shared by the current-era component and the September-era loss: record the policy's
    rollouts from `LEAD_EPOCHS` epochs before `epoch_idx`, collapse once at the first epoch >= `epoch_idx`
    at which the rollouts fill every part of the data, report."""

    def __init__(self, section: BaseModel, era: Era, wandb_run: Any = None, agents_per_env: int = 1):
        self.section = section
        self.era = era
        self.wandb_run = wandb_run
        self.agents_per_env = agents_per_env
        self.rollouts: Rollouts | None = None  # outlives its hooks, which live only while watching
        self.failed = False

    def pending(self, agent: nn.Module) -> bool:
        return self.section.enabled and not self.failed and getattr(agent, MARKER, None) is None

    def watch(self, agent: nn.Module, epoch: int) -> None:
        if not self.pending(agent) or epoch + LEAD_EPOCHS < self.section.epoch_idx:
            return
        prefix, layout = find_fast(agent, self.era, self.section.core)
        if self.rollouts is None:
            self.rollouts = Rollouts(layout, self.section.fit_steps, self.agents_per_env)
        self.rollouts.watch(agent.get_submodule(prefix), layout)

    def unwatch(self) -> None:
        if self.rollouts is not None:
            self.rollouts.unwatch()

    def maybe_collapse(self, agent: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, agent_step: int):
        if not self.pending(agent) or epoch < self.section.epoch_idx:
            return None
        rollouts = self.rollouts
        if rollouts is None or not rollouts.ready():
            counts = rollouts.counts if rollouts else 0
            sizes = rollouts.sizes if rollouts else "fit, select and report"
            log.warning("collapse due at epoch %d waits for rollouts: %s rows of %s", epoch, counts, sizes)
            return None
        try:
            record = collapse_agent(agent, optimizer, self.era, self.section, rollouts)
        except Exception as error:
            self.failed = True
            self.unwatch()
            message = (
                f"COLLAPSE FAILED at epoch {epoch}: the policy and the optimizer are unchanged, training goes on "
                f"uncollapsed. {type(error).__name__}: {error}"
            )
            log.error(message, exc_info=True)
            self.log({"collapse/failed": 1.0})
            raise CollapseFailed(message) from error
        self.unwatch()
        self.rollouts = None
        record |= {"epoch": epoch, "agent_step": agent_step}
        setattr(agent, MARKER, record)
        self.log(metrics(record))
        log.warning(
            "collapse at epoch %d: %d -> %d parameters, KL mean %.2e, value error %.2e (%s); widths %s",
            epoch,
            record["params_before"],
            record["params_after"],
            record["kl_mean"],
            record["value_err"],
            record["measured_on"],
            {layer["name"]: f"{layer['width_before']}->{layer['width_after']}" for layer in record["layers"]},
        )
        return record

    def log(self, values: dict[str, float]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(values)
            self.wandb_run.summary.update(values)


def metrics(record: dict) -> dict[str, float]:
    """The record as flat numbers, for wandb (`collapse/...`) and Metta's loss stats."""
    values = {f"collapse/{key}": float(value) for key, value in record.items() if isinstance(value, int | float)}
    for layer in record["layers"]:
        values[f"collapse/width_before/{layer['name']}"] = float(layer["width_before"])
        values[f"collapse/width_after/{layer['name']}"] = float(layer["width_after"])
    return values


# ----- Metta's classes, built on first use (the base classes are parameters so tests can stand in for them)


def sync_architecture(architecture: BaseModel, root: nn.Module) -> bool:
    """Write the live `FastPolicy`'s widths into its `FastConfig`: Metta's checkpoints store that config
    (`to_spec`) and rebuild the policy from it before loading the weights strictly. True if a width changed."""
    encoder = architecture.cnn_encoder_config
    sizes = {"cnn1": "out_channels", "cnn2": "out_channels", "fc1": "out_features", "encoded_obs": "out_features"}
    layers = {
        f"{name}_cfg": {**getattr(encoder, f"{name}_cfg"), size: getattr(root.cnn_encoder.get_submodule(name), size)}
        for name, size in sizes.items()
    }
    heads = {
        "actor_hidden_dim": root.get_submodule("actor_1.module").out_features,
        "critic_hidden_dim": root.get_submodule("critic_1.module").out_features,
    }
    before = architecture.model_dump()
    architecture.cnn_encoder_config = encoder.model_copy(update=layers)
    for name, width in heads.items():
        setattr(architecture, name, width)
    if getattr(architecture, "class_path", "").endswith(".NarrowFastPolicy"):
        from metta_collapse.integrations.cortex_core import narrow_core_config

        core, lstm = architecture.cortex_core_config, root.get_submodule(CORTEX_LSTM)
        if (lstm.input_size, lstm.hidden_size) != (core.d_hidden, core.out_features or core.d_hidden):
            architecture.cortex_core_config = narrow_core_config(core, lstm.input_size, lstm.hidden_size)
    return architecture.model_dump() != before


def component_class(base: type) -> type:
    """Current era: a `TrainerComponent` collapsing at `on_epoch_end(epoch)` once epoch >= epoch_idx, and
    keeping `architecture` (the train tool's `policy_architecture`, which Metta's checkpointer serialises) at
    the live policy's widths — after a collapse, and on a resumed run whose checkpoint was collapsed."""

    class CollapseComponent(base):
        def __init__(self, hook: CollapseHook, architecture: BaseModel | None = None):
            super().__init__(epoch_interval=1)
            self.hook = hook
            self.architecture = architecture

        def register(self, context: Any) -> None:
            super().register(context)
            try:
                loaded_collapsed = self.sync()
            except mc.CollapseError:
                if self.hook.section.enabled:
                    raise
                return  # not a `fast` policy, and no collapse asked for
            if loaded_collapsed and self.hook.pending(context.policy):
                setattr(context.policy, MARKER, {"loaded_collapsed": True})
                log.warning("the policy was loaded narrower than the recipe's architecture: no second collapse")
            env_info = getattr(getattr(context, "env", None), "policy_env_info", None)
            self.hook.agents_per_env = getattr(env_info, "num_agents", 1)
            self.hook.watch(context.policy, context.epoch)

        def on_epoch_end(self, epoch: int) -> None:
            context = self.context
            if self.hook.maybe_collapse(context.policy, context.optimizer, epoch, context.agent_step) is not None:
                self.sync()
            self.hook.watch(context.policy, epoch)

        def sync(self) -> bool:
            if self.architecture is None:
                return False
            prefix, _ = find_fast(self.context.policy, "current", self.hook.section.core)
            return sync_architecture(self.architecture, self.context.policy.get_submodule(prefix))

    return CollapseComponent


def loss_class(base: type) -> type:
    """September era: a `BaseLoss` collapsing in `on_new_training_run` once `trainer_state.epoch >= epoch_idx`
    (the epoch advances by update_epochs); its rollouts are watched during the rollout phase only, so the hooks
    are never pickled with a checkpointed agent. A failed collapse is logged and counted (`losses/collapse_failed`)."""

    class CollapseLoss(base):
        def __init__(self, policy: nn.Module, trainer_cfg: Any, vec_env: Any, device: Any, *args: Any):
            super().__init__(policy, trainer_cfg, vec_env, device, *args)
            agents_per_env = getattr(getattr(vec_env, "driver_env", None), "num_agents", 1)
            self.hook = CollapseHook(self.loss_cfg.section, "september", agents_per_env=agents_per_env)

        def on_new_training_run(self, trainer_state: Any) -> None:
            super().on_new_training_run(trainer_state)
            try:
                record = self.hook.maybe_collapse(
                    self.policy, trainer_state.optimizer, trainer_state.epoch, trainer_state.agent_step
                )
            except CollapseFailed:  # logged; September's trainer would die of it, so training goes on uncollapsed
                self.loss_tracker["collapse_failed"].append(1.0)
                return
            if record is not None:
                for key, value in metrics(record).items():
                    self.loss_tracker[key.replace("/", "_")].append(value)

        def on_rollout_start(self, trainer_state: Any) -> None:
            super().on_rollout_start(trainer_state)
            self.hook.watch(self.policy, trainer_state.epoch)

        def on_train_phase_end(self, trainer_state: Any) -> None:
            super().on_train_phase_end(trainer_state)
            self.hook.unwatch()

    return CollapseLoss


def refuse_unsupported(tool: Any) -> None:
    """Before training: settings under which an in-place change of parameter shapes would break Metta's run."""
    if not tool.collapse.enabled:
        return
    try:  # Metta's override check validates the leaf's type only, not the section's bounds
        type(tool.collapse).model_validate(tool.collapse.model_dump())
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise ValueError(f"collapse.{field}={problem.get('input')!r}: {problem['msg']}") from None
    mc.config.check_section(tool.collapse)
    if tool.collapse.core == "stock" and detect_era() == "september":
        raise ValueError("collapse.core=stock keeps current Metta's Cortex core; September's LSTM always collapses")
    if getattr(tool.trainer, "compile", False):
        raise ValueError("trainer.compile=true is not supported with collapse.enabled: shapes change mid-training")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"collapse.enabled with {world} processes (WORLD_SIZE): DistributedDataParallel keeps the old parameters, "
            "so the collapse runs single-process only: train past epoch_idx in one process, then resume "
            "distributed with collapse.enabled=false (the checkpoint carries the collapsed widths)"
        )


def limit_threads() -> None:
    """One torch / OpenMP thread unless OMP_NUM_THREADS says otherwise: with more, Metta's trainer beside another
    job oversubscribes the cores (measured: 283 agent steps/s instead of 5,260)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def narrow_architecture(architecture: BaseModel) -> BaseModel:
    """Metta's `FastConfig` as `NarrowFastConfig` (the same fields), whose policy can be built with a core
    narrower than its input; any other architecture as it is."""
    from metta.agent.policies.fast import FastConfig

    if type(architecture) is not FastConfig:
        return architecture
    from metta_collapse.integrations.cortex_core import NarrowFastConfig

    fields = {name: getattr(architecture, name) for name in type(architecture).model_fields if name != "class_path"}
    return NarrowFastConfig(**fields)


def apply_epoch_fraction(tool: Any) -> None:
    """A sweep trial's `collapse.epoch_fraction` becomes its `collapse.epoch_idx`, inside its agent steps."""
    section = tool.collapse
    if section.enabled and section.epoch_fraction is not None:
        epochs = math.ceil(tool.trainer.total_timesteps / tool.trainer.batch_size)
        section.epoch_idx = mc.config.epoch_at_fraction(section.epoch_fraction, epochs)


@functools.cache
def metta_train_tool_class() -> type:
    """Metta's `TrainTool` plus the `collapse` section, for the era found."""
    from metta.tools.train import TrainTool

    section_type = metta_section_class()  # not `section`: a class body's annotation would shadow it
    if detect_era() == "current":
        from metta.rl.training.component import TrainerComponent

        component = component_class(TrainerComponent)

        class CollapseTrainTool(TrainTool):
            collapse: section_type = Field(default_factory=section_type)

            def invoke(self, *args: Any) -> int | None:
                refuse_unsupported(self)
                apply_epoch_fraction(self)
                limit_threads()
                if self.collapse.enabled and self.collapse.core == "shrink":
                    self.policy_architecture = narrow_architecture(self.policy_architecture)
                return super().invoke(*args)

            def _register_components(self, *, trainer: Any, wandb_run: Any = None, **kwargs: Any) -> None:
                super()._register_components(trainer=trainer, wandb_run=wandb_run, **kwargs)
                hook = CollapseHook(self.collapse, "current", wandb_run)
                trainer.register(component(hook, self.policy_architecture))

        return CollapseTrainTool

    from metta.mettagrid.config import Config
    from metta.rl.loss.base_loss import BaseLoss

    loss = loss_class(BaseLoss)

    class CollapseLossConfig(Config):
        section: section_type

        def init_loss(self, policy: nn.Module, trainer_cfg: Any, vec_env: Any, device: Any, *args: Any):
            return loss(policy, trainer_cfg, vec_env, device, *args)

    class CollapseTrainTool(TrainTool):
        collapse: section_type = Field(default_factory=section_type)

        def invoke(self, *args: Any) -> int | None:
            refuse_unsupported(self)
            apply_epoch_fraction(self)
            limit_threads()
            self.trainer.losses.loss_configs["collapse"] = CollapseLossConfig(section=self.collapse)
            return super().invoke(*args)

    return CollapseTrainTool


def metta_train() -> Any:
    """Metta's `arena_basic_easy_shaped` train tool with the `fast` policy, plus the `collapse` section. The run
    name comes as Metta's `run=` argument, which Metta's train tool takes itself."""
    if detect_era() == "current":
        from metta.agent.policies.fast import FastConfig
        from recipes.prod import arena_basic_easy_shaped

        architecture = FastConfig()
        # a8d1ece's FastPolicy leaves the Cortex replay keys (row_id, t_in_row) out of its experience spec, so
        # training with stored core states fails at the first minibatch (KeyError in cortex.py); start each
        # training segment from zero state instead, as PufferLib does
        core = architecture.cortex_core_config.model_copy(update={"pass_state_during_training": False})
        architecture.cortex_core_config = core
        base = arena_basic_easy_shaped.train(policy_architecture=architecture)
    else:
        from metta.agent.agent_config import AgentConfig

        from experiments.recipes import arena_basic_easy_shaped

        base = arena_basic_easy_shaped.train()
        # the study's component `fast` (Metta's default); `policy_architecture.name=pytorch/fast` works too
        base.policy_architecture = base.policy_architecture or AgentConfig()
    # attribute objects, not model_dump(): typed sub-configs stay typed
    return metta_train_tool_class()(**{name: getattr(base, name) for name in type(base).model_fields})


def metta_sweep(sweep_name: str, recipe: str) -> Any:
    """Current era: Metta's Protein sweep over the collapse's parameter budget and the fraction of the run at
    which it comes (override paths of the train tool, so a trial is `./tools/run.py ... path=value`)."""
    if detect_era() != "current":
        raise NotImplementedError("the Metta sweep is built for the current era only; September: use the embedded one")
    from metta.sweep.core import Distribution as D
    from metta.sweep.core import SweepParameters as SP
    from metta.sweep.core import make_sweep

    parameters = [
        SP.param(path, D.LOGIT_NORMAL, min=low, max=high, search_center=center)
        for path, (low, high, center) in mc.config.SWEEP_SPACE.items()
    ]
    return make_sweep(
        name=sweep_name,
        recipe=recipe,
        train_entrypoint="train",
        eval_entrypoint="evaluate_in_sweep",
        metric_key="evaluator/eval_sweep/score",
        search_space=parameters,
    )
