"""The collapse of a live Metta agent, shared by both eras: the rollouts it is chosen on, the operation, and
the hook that decides when (wired into Metta's trainer by `current` and `september`)."""

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

import metta_collapse as mc
from metta_collapse.activations import collapsed_inputs
from metta_collapse.integrations import Era
from metta_collapse.integrations.fast import FastLayout, find_fast
from metta_collapse.live import Data, collapse_live, collapse_replicas

# set on the agent after a collapse; September checkpoints pickle the agent, so a resumed run sees it
MARKER = "metta_collapse_record"
LEAD_EPOCHS = 2  # rollouts are recorded from this many epochs before epoch_idx
STATES = ("h", "c")  # the chain's recurrent-state inputs: (layers, rows, hidden)
log = logging.getLogger(__name__)


def engine_config(section: BaseModel) -> mc.CollapseConfig:
    return mc.CollapseConfig(
        thresholds=mc.Thresholds(**section.thresholds.model_dump()),
        rank_tol=mc.RankTol(**section.rank_tol.model_dump()),
        metric=section.metric,
    )


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

    def detached(self) -> "Rollouts":
        """A copy without the hooks, to send to other processes."""
        rollouts = copy.copy(self)
        rollouts.handles, rollouts.step = [], {}
        return rollouts

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

    def maybe_collapse(
        self, agent: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, agent_step: int, helper: Any = None
    ) -> dict | None:
        """Collapse `agent` if due. `helper` is Metta's DistributedHelper: with more processes than one, every
        process collapses its replica on rank 0's rollouts; unless all succeed and the replicas are bit-identical,
        every process puts its replica back. `agent`'s DistributedDataParallel wrapper is rebuilt in place."""
        if not self.pending(agent) or epoch < self.section.epoch_idx:
            return None
        rollouts = self.rollouts
        if helper is not None and helper.is_distributed:
            rollouts = helper.broadcast_from_master(None if rollouts is None else rollouts.detached())
        if rollouts is None or not rollouts.ready():
            counts = rollouts.counts if rollouts else 0
            sizes = rollouts.sizes if rollouts else "fit, select and report"
            log.warning("collapse due at epoch %d waits for rollouts: %s rows of %s", epoch, counts, sizes)
            return None
        wrapped = isinstance(agent, nn.parallel.DistributedDataParallel)
        replica = agent.module if wrapped else agent
        collapse = functools.partial(collapse_agent, replica, optimizer, self.era, self.section, rollouts)
        replica, record, errors, cause = collapse_replicas(replica, optimizer, [], wrapped, collapse)
        if wrapped:  # Metta's DistributedPolicy(policy, device), rebuilt in place: whoever holds it trains on
            type(agent).__init__(agent, replica, next(replica.parameters()).device)
        self.unwatch()
        if errors:
            self.failed = True
            message = (
                f"COLLAPSE FAILED at epoch {epoch}: the policy and the optimizer are unchanged, training goes on "
                f"uncollapsed. {'; '.join(errors)}"
            )
            log.error(message, exc_info=cause)
            self.log({"collapse/failed": 1.0})
            raise CollapseFailed(message) from cause
        self.rollouts = None
        record |= {"epoch": epoch, "agent_step": agent_step}
        setattr(agent, MARKER, record)
        self.log(metrics(record))
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"collapse/{key}": record[key] for key in ("mode", "metric", "refit")})
        log.warning(
            "collapse at epoch %d: %d -> %d parameters, %d -> %d multiply-adds per agent step; on the report part, "
            "KL(old || new) of the actions mean %.2e, value error max|dv|/max|v| %.2e (%s); changed layers "
            "(units, parameters) %s",
            epoch,
            record["params_before"],
            record["params_after"],
            record["macs_per_step_before"],
            record["macs_per_step_after"],
            record["kl_mean"],
            record["value_err"],
            record["measured_on"],
            {
                layer["name"]: f"{layer['width_before']}->{layer['width_after']}, "
                f"{layer.get('params_before')}->{layer.get('params_after')}"
                for layer in record["layers"]
                if layer["width_after"] != layer["width_before"]
            },
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
