"""Collapse a live training state — the policy, its optimizer and the trainer's recurrent-state buffers —
in place and all or nothing. Knows no trainer: the embedded runtime and the Metta adapter both call it."""

import math
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from metta_collapse.analysis import analyze
from metta_collapse.config import CollapseConfig, ModelSpec
from metta_collapse.errors import CollapseError
from metta_collapse.plan import CollapsePlan
from metta_collapse.rewrite import ablate, collapse, map_state, reinitialize, remap_optimizer, transaction

Mode = Literal["fibration", "random_ablation", "scratch"]
Behaviour = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PackedState:
    """A recurrent-state buffer a trainer holds: `holder[key]` is the states of the model inputs named in
    `parts`, concatenated along the last axis (e.g. [h1 | h2] for two stacked LSTM layers)."""

    holder: MutableMapping
    key: Any
    parts: list[str]


def _remap_buffer(plan: CollapsePlan, buffer: PackedState, reset: bool) -> torch.Tensor:
    packed = buffer.holder[buffer.key]
    widths = [
        sum(space.n for space in plan.states[name].spaces) if name in plan.states else None for name in buffer.parts
    ]
    if None in widths or sum(widths) != packed.shape[-1]:
        raise CollapseError(
            f"recurrent-state buffer {buffer.key!r} of width {packed.shape[-1]} is not the "
            f"concatenation of the plan's states {buffer.parts}"
        )
    pieces = [
        map_state(plan, name, piece, plan.kept)
        for name, piece in zip(buffer.parts, packed.split(widths, dim=-1), strict=True)
    ]
    mapped = torch.cat(pieces, dim=-1)
    return torch.zeros_like(mapped) if reset else mapped


def behaviour_change(
    before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """KL(old || new) of the action distributions and the value change relative to the values' scale."""
    (old_logits, old_values), (new_logits, new_values) = before, after
    old_log_p, new_log_p = torch.log_softmax(old_logits, -1), torch.log_softmax(new_logits, -1)
    kl = (old_log_p.exp() * (old_log_p - new_log_p)).sum(-1)
    scale = old_values.abs().max().clamp_min(1e-8)
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "value_err": ((new_values - old_values).abs().max() / scale).item(),
    }


def collapse_live(
    policy: nn.Module,
    target: str,
    inputs: tuple,
    spec: ModelSpec,
    config: CollapseConfig,
    optimizer: torch.optim.Optimizer,
    buffers: list[PackedState],
    behaviour: Behaviour,
    mode: Mode = "fibration",
    seed: int = 0,
    optimizer_state: Literal["remap", "reset"] = "remap",
    recurrent_state: Literal["map", "reset"] = "map",
    after_rewrite: Callable[[CollapsePlan], None] | None = None,
) -> tuple[CollapsePlan, dict]:
    """Shrink `policy.get_submodule(target)` in place and carry `optimizer` and `buffers` along.

    `inputs` are the submodule's inputs on recent real observations; `behaviour()` runs the whole policy on a
    recent segment and returns (logits, values), compared before and after. `random_ablation` keeps random
    units at the plan's widths, `scratch` also re-initialises them with fresh optimizer state. `after_rewrite(plan)`
    updates what the policy keeps beside its parameters (size attributes, copies of weights). On any failure
    the policy, the optimizer and the buffers are exactly as before and the error propagates."""
    start = time.perf_counter()
    module = policy.get_submodule(target)
    with torch.no_grad():
        before = behaviour()
    plan = analyze(module, inputs, config, spec)
    params_before = sum(p.numel() for p in policy.parameters())
    saved = [(buffer.holder, buffer.key, buffer.holder[buffer.key]) for buffer in buffers]
    # re-initialising writes into the parameters that keep their width; everything else gets new tensors
    weights = [(p, p.detach().clone()) for p in policy.parameters()] if mode == "scratch" else []
    reset = optimizer_state == "reset" or mode == "scratch"
    try:
        with transaction(policy, optimizer):
            if mode == "fibration":
                collapse(module, plan)
            else:
                ablate(module, plan, seed)
            if mode == "scratch":
                reinitialize(module, seed)
                for param in policy.parameters():
                    optimizer.state.pop(param, None)
            remap_optimizer(optimizer, module, plan, reset=reset)
            for buffer in buffers:
                buffer.holder[buffer.key] = _remap_buffer(plan, buffer, recurrent_state == "reset")
            if after_rewrite is not None:
                after_rewrite(plan)
            with torch.no_grad():
                change = behaviour_change(before, behaviour())
            if not all(math.isfinite(value) for value in change.values()):
                raise CollapseError(f"the collapsed policy's behaviour is not finite: {change}")
    except BaseException:
        for holder, key, tensor in saved:
            holder[key] = tensor
        with torch.no_grad():
            for param, weight in weights:
                param.copy_(weight)
        raise
    record = {
        "mode": mode,
        "metric": config.metric,
        "thresholds": config.thresholds.model_dump(),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in policy.parameters()),
        "seconds": time.perf_counter() - start,
        **change,
        "layers": plan.to_dict()["layers"],
    }
    return plan, record
