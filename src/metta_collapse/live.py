"""Collapse a live training state — the policy, its optimizer and the trainer's recurrent-state buffers —
in place and all or nothing. Knows no trainer: the embedded runtime and the Metta adapter both call it."""

import copy
import functools
import hashlib
import math
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metta_collapse.activations import recurrent_layers
from metta_collapse.analysis import analyze
from metta_collapse.basis import apply_widths, bases, scale_within, smallest_scale, structure, widths_at
from metta_collapse.config import Budget, CollapseConfig, ModelSpec, RankTol, Thresholds
from metta_collapse.errors import CollapseError
from metta_collapse.plan import CollapsePlan
from metta_collapse.refitting import refit
from metta_collapse.rewrite import (
    RecurrentStack,
    ablate,
    collapse,
    keep,
    map_state,
    reinitialize,
    remap_optimizer,
    transaction,
)

Mode = Literal["fibration", "random_ablation", "scratch"]
# (logits, values) of a policy, given the plan it was collapsed with (None: not collapsed), which maps inputs
# such as recorded recurrent states to its widths
Behaviour = Callable[[nn.Module, CollapsePlan | None], tuple[torch.Tensor, torch.Tensor]]


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
    """KL(old || new) of the action distributions, the largest value change relative to the largest value
    (max|Δv| / max|v|), and how often the most likely action stays the same."""
    (old_logits, old_values), (new_logits, new_values) = ((t.double() for t in pair) for pair in (before, after))
    old_log_p, new_log_p = torch.log_softmax(old_logits, -1), torch.log_softmax(new_logits, -1)
    kl = (old_log_p.exp() * (old_log_p - new_log_p)).sum(-1)
    scale = old_values.abs().max().clamp_min(1e-8)
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "value_err": ((new_values - old_values).abs().max() / scale).item(),
        "top1": (old_logits.argmax(-1) == new_logits.argmax(-1)).double().mean().item(),
    }


def _recurrent_macs(module: nn.Module) -> int:
    """Multiply-adds per step of the recurrent layers in `module`, whose fused ops torch's FlopCounterMode does
    not count: each weight matrix multiplies once per step."""
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.RNNBase) for p in m.parameters() if p.dim() == 2)


def cost(policy: nn.Module, behaviour: Behaviour, plan: CollapsePlan | None) -> tuple[tuple, dict, dict]:
    """`behaviour` run on `policy`; what one agent step of it costs (seconds, multiply-adds); the multiply-adds
    per agent step of each module, by name, as torch's FlopCounterMode counts them."""
    with torch.no_grad():
        start = time.perf_counter()
        outputs = behaviour(policy, plan)
        seconds = time.perf_counter() - start
        with FlopCounterMode(display=False) as counter:
            behaviour(policy, plan)
    steps = outputs[0].shape[:-1].numel()
    counted = {name: sum(ops.values()) / 2 / steps for name, ops in counter.get_flop_counts().items()}
    macs = round(counted.get("Global", 0) + _recurrent_macs(policy))
    return outputs, {"seconds_per_step": seconds / steps, "macs_per_step": macs}, counted


def _counted_macs(counted: dict, name: str) -> float:
    """The multiply-adds FlopCounterMode counted in the module `name` (relative to the collapsed module)."""
    return next((n for key, n in counted.items() if key.endswith(f".{name}")), 0)


def layer_costs(module: nn.Module, names: list[str], counted: dict) -> dict[str, dict]:
    """Parameters and multiply-adds per agent step of the named layers of `module` (`counted`: from `cost`)."""
    costs = {}
    for name in names:
        owner, _, index = name.rpartition(".l")
        try:
            layer = module.get_submodule(name)
            params = list(layer.parameters())
            macs = _recurrent_macs(layer) + _counted_macs(counted, name)
        except AttributeError:  # a bare parameter, or layer `index` of a multi-layer recurrent module (or its stack)
            recurrent = module.get_submodule(owner) if owner and index.isdigit() else None
            if not isinstance(recurrent, nn.RNNBase | RecurrentStack):
                continue
            params = list(recurrent_layers(recurrent)[int(index)].values())
            macs = sum(p.numel() for p in params if p.dim() == 2)
        costs[name] = {"params": sum(p.numel() for p in params), "macs": round(macs)}
    return costs


def weight_uses(module: nn.Module, counted: dict) -> dict[str, float]:
    """Per weight of `module`, by name, the multiply-adds per agent step of each of its entries (`counted`: from
    `cost`): a linear or convolutional layer's count over its weight's size (a convolution's weight is used at
    every position), a recurrent weight matrix once."""
    uses = {}
    for owner, layer in module.named_modules():
        if isinstance(layer, nn.RNNBase):
            uses |= {f"{owner}.{name}".lstrip("."): 1.0 for name, p in layer.named_parameters() if p.dim() == 2}
        elif isinstance(layer, nn.Linear | nn.modules.conv._ConvNd) and owner:
            uses[f"{owner}.weight"] = _counted_macs(counted, owner) / layer.weight.numel()
    return uses


@dataclass
class Data:
    """What a collapse sees of the policy's experience, in disjoint parts: `fit`, the collapsed module's inputs
    the units are chosen and the refit solved on; `select`, its inputs on other rollouts, on which a basis's
    widths are judged; and the policy's (logits, values) on the select and the report part, as functions of a
    policy (the live one or a trial copy) and its plan. The record's behaviour figures come from the report
    part alone."""

    fit: tuple
    report: Behaviour
    select: tuple | None = None
    select_behaviour: Behaviour | None = None
    description: str = ""
    example: tuple | None = None  # a small input for the weight-only analysis (default: `fit`)


class Sizer:
    """Plans of the module at a scale of the chosen units' own knob (the weight metrics' thresholds, the
    basis's rank_tol): the bases of the activations are computed once."""

    def __init__(self, module: nn.Module, data: Data, spec: ModelSpec, config: CollapseConfig):
        self.module, self.data, self.spec, self.config = module, data, spec, config
        if config.metric == "basis":
            self.structure, free = structure(module, data.example or data.fit, spec, None)
            self.bases = bases(module, self.structure, free, data.fit, data.select)

    @property
    def largest_scale(self) -> float:
        """The scale at which every knob is at its end (a tolerance of 1, a threshold of 2): one unit a layer."""
        basis = self.config.metric == "basis"
        knob = (self.config.rank_tol if basis else self.config.thresholds).model_dump().values()
        return (1.0 if basis else 2.0) / max(min(knob), 1e-3)

    def plan(self, scale: float) -> tuple[CollapsePlan, dict | None, dict]:
        """The plan, the units a basis keeps (None: merge the fibers), and the knob's values at `scale`."""
        c = self.config
        if c.metric == "basis":
            plan = copy.deepcopy(self.structure)
            kept = apply_widths(plan, self.bases, widths_at(self.bases, c.rank_tol, scale))
            return plan, kept, {"rank_tol": c.rank_tol.scaled(scale)}
        thresholds = {kind: min(2.0, value * scale) for kind, value in c.thresholds.model_dump().items()}
        scaled = c.model_copy(update={"thresholds": Thresholds(**thresholds)})
        plan = analyze(self.module, self.data.example or self.data.fit, scaled, self.spec)
        return plan, None, {"thresholds": thresholds}

    def allocate(
        self,
        within: Callable[[CollapsePlan], bool],
        what: str,
        change: Callable[[float], float],
        factors: tuple[float, ...] = (0.5,),
    ) -> float:
        """A size budget with a basis: of the configured rank tolerances and those with one kind's times one of
        `factors` (the others then tighten or loosen to keep the budget), the ones whose plan `within` the budget
        changes the policy least, `change(scale)` (the select part's KL after the refit). Sets them as the config;
        returns their scale."""
        base, best, seen = self.config, None, set()
        for kind, factor in [(None, 1.0), *((k, f) for f in factors for k in RankTol.model_fields)]:
            tolerances = base.rank_tol.model_dump()
            if kind is not None:
                tolerances[kind] = min(1.0, tolerances[kind] * factor)
            self.config = base.model_copy(update={"rank_tol": RankTol(**tolerances)})
            scale = self.for_size(within, what)
            widths = tuple(widths_at(self.bases, self.config.rank_tol, scale))
            if widths not in seen:
                seen.add(widths)
                candidate = (change(scale), self.config, scale)
                best = candidate if best is None or candidate[0] < best[0] else best
        self.config = best[1]
        return best[2]

    def for_size(self, within: Callable[[CollapsePlan], bool], what: str) -> float:
        """The smallest scale whose plan is `within` a size budget."""
        if self.config.metric == "basis":
            return scale_within(copy.deepcopy(self.structure), self.bases, self.config.rank_tol, within, what)
        return smallest_scale(
            lambda scale: within(self.plan(scale)[0]),
            1e-3,
            self.largest_scale,
            what,
            steps=12,  # each step is an analysis
        )


def _apply(
    policy: nn.Module,
    target: str,
    plan: CollapsePlan,
    kept: dict | None,
    mode: Mode,
    seed: int,
    data: Data,
    refit_weights: bool,
    original: nn.Module,
) -> dict:
    """Rewrite `policy.get_submodule(target)` with `plan` in place, then refit it; returns the refit's report."""
    module = policy.get_submodule(target)
    if mode == "fibration" and kept is None:
        collapse(module, plan)
    elif mode == "fibration":
        keep(module, plan, kept)
    else:
        ablate(module, plan, seed)
    if mode == "scratch":
        reinitialize(module, seed)
        return {}
    return refit(module, original, plan, data.fit) if refit_weights else {}


def collapse_live(
    policy: nn.Module,
    target: str,
    data: Data,
    spec: ModelSpec,
    config: CollapseConfig,
    optimizer: torch.optim.Optimizer,
    buffers: list[PackedState],
    mode: Mode = "fibration",
    seed: int = 0,
    optimizer_state: Literal["remap", "reset"] = "remap",
    recurrent_state: Literal["map", "reset"] = "map",
    after_rewrite: Callable[[CollapsePlan], None] | None = None,
    refit_weights: bool = True,
    budget: Budget | None = None,
) -> tuple[CollapsePlan, dict]:
    """Shrink `policy.get_submodule(target)` in place and carry `optimizer` and `buffers` along.

    The size comes from the knob of `config.metric` or from `budget`. `random_ablation` keeps random units at
    the plan's widths, `scratch` also re-initialises them with fresh optimizer state. Unless `scratch`, the
    rewritten layers are refitted on `data.fit` (`refit_weights`). `after_rewrite(plan)` updates what the policy
    keeps beside its parameters (size attributes, copies of weights). On any failure the policy, the optimizer
    and the buffers are exactly as before and the error propagates."""
    budget = budget or Budget()
    module = policy.get_submodule(target)
    start = time.perf_counter()
    before, cost_before, counted_before = cost(policy, data.report, None)
    measuring = time.perf_counter() - start
    start = time.perf_counter()
    sizer = Sizer(module, data, spec, config)
    original = copy.deepcopy(module)

    @functools.cache
    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return data.select_behaviour(policy, None)

    def select_kl(scale: float) -> float:
        """The select part's KL after a trial collapse at `scale`, on a copy of the policy, in the method's mode
        whatever `mode` is: a null model gets the widths the method would get."""
        trial = copy.deepcopy(policy)
        plan, kept, _ = sizer.plan(scale)
        _apply(trial, target, plan, kept, "fibration", seed, data, refit_weights, original)
        with torch.no_grad():
            return behaviour_change(reference(), data.select_behaviour(trial, plan))["kl_mean"]

    params_before = sum(p.numel() for p in policy.parameters())
    scale = 1.0
    if budget.size is not None:
        size, fraction = budget.size
        uses, macs_before = weight_uses(module, counted_before), cost_before["macs_per_step"]

        def within(plan: CollapsePlan) -> bool:
            if size == "params":  # of the whole policy, as the user counts, not only of the analysed module
                return params_before - (plan.params_before - plan.params_after) <= fraction * params_before
            # only the weights `uses` knows shrink the count; any other multiply-add is counted as kept
            saved = sum(
                uses[name] * (math.prod(p.shape) - math.prod(p.new_shape()))
                for name, p in plan.params.items()
                if name in uses
            )
            return macs_before - saved <= fraction * macs_before

        what = f"budget.{size}={fraction}"
        if config.metric == "basis" and data.select_behaviour is not None:
            # under a multiply-add budget one kind may also take most of the cut: the convolutions hold most of them
            factors = (0.5,) if size == "params" else (0.5, 4.0)
            scale = sizer.allocate(within, what, select_kl, factors)
        else:
            scale = sizer.for_size(within, what)
    elif budget.kl is not None:
        if data.select_behaviour is None:
            raise CollapseError("budget.kl needs the select part of the data")
        # the largest collapse within the budget: the smallest model whose KL stays under it
        scale = 1.0 / smallest_scale(
            lambda inverse: select_kl(1.0 / inverse) <= budget.kl,
            1.0 / sizer.largest_scale,
            1e3,
            f"budget.kl={budget.kl}",
            steps=6,
        )
    plan, kept, knob = sizer.plan(scale)
    names = [layer.name for layer in plan.layers]
    layers_before = layer_costs(module, names, counted_before)
    saved = [(buffer.holder, buffer.key, buffer.holder[buffer.key]) for buffer in buffers]
    # re-initialising and the refit write into parameters that keep their width; everything else gets new tensors
    weights = [(p, p.detach().clone()) for p in policy.parameters()]
    reset = optimizer_state == "reset" or mode == "scratch"
    try:
        with transaction(policy, optimizer):
            fitted = _apply(policy, target, plan, kept, mode, seed, data, refit_weights, original)
            if mode == "scratch":
                for param in policy.parameters():
                    optimizer.state.pop(param, None)
            remap_optimizer(optimizer, module, plan, reset=reset)
            for buffer in buffers:
                buffer.holder[buffer.key] = _remap_buffer(plan, buffer, recurrent_state == "reset")
            if after_rewrite is not None:
                after_rewrite(plan)
            seconds = time.perf_counter() - start
            after, cost_after, counted_after = cost(policy, data.report, plan)
            layers_after = layer_costs(module, names, counted_after)
            change = behaviour_change(before, after)
            measuring += time.perf_counter() - start - seconds
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
        **knob,
        "budget": budget.model_dump(),
        "refit": refit_weights and mode != "scratch",
        "params_before": params_before,
        "params_after": sum(p.numel() for p in policy.parameters()),
        "seconds": seconds,
        "seconds_record": measuring,
        **change,
        **{f"{key}_before": value for key, value in cost_before.items()},
        **{f"{key}_after": value for key, value in cost_after.items()},
        "measured_on": data.description,
        "refitted": [layer["name"] for layer in fitted.get("layers", [])],
        "kept_merged": fitted.get("kept_merged", []),
        "layers": [
            layer
            | {f"{key}_before": value for key, value in layers_before.get(layer["name"], {}).items()}
            | {f"{key}_after": value for key, value in layers_after.get(layer["name"], {}).items()}
            for layer in plan.to_dict()["layers"]
        ],
    }
    return plan, record


# ----- replicas: under torch.distributed every process collapses its own copy of the policy on the same data


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order ([value] without torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def fingerprint(policy: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A digest of the parameters and their optimizer state, bit for bit."""
    digest = hashlib.sha256()
    for param in policy.parameters():
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        for name, value in sorted(optimizer.state.get(param, {}).items()):
            digest.update(name.encode())
            digest.update(torch.as_tensor(value).detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def agree(error: str | None, policy: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """What went wrong anywhere after every process collapsed its replica (`error`: this one's failure, None if
    it collapsed): each failure with its rank, or that the replicas differ; [] when all are bit-identical."""
    outcomes = gather((error, None if error else fingerprint(policy, optimizer)))
    ranked = len(outcomes) > 1
    errors = [f"rank {rank}: {e}" if ranked else e for rank, (e, _) in enumerate(outcomes) if e]
    if not errors and len({digest for _, digest in outcomes}) > 1:
        errors = ["the replicas differ after the collapse"]
    return errors


def collapse_replicas(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    buffers: list[PackedState],
    replicated: bool,
    collapse: Callable[[], dict],
) -> tuple[nn.Module, dict | None, list[str], Exception | None]:
    """Run `collapse` (of `policy`, `optimizer` and `buffers` in place, all or nothing, on the same data in every
    process). Unless every process collapsed and the replicas are bit-identical, each puts back what it had: one
    that failed already has, one that collapsed takes back a copy made before (`replicated`: other processes hold
    replicas). Returns the policy to train (this one, or that copy), the record (None unless all collapsed), what
    went wrong where ([] if nothing) and this process's own error."""
    saved = copy.deepcopy((policy, optimizer)) if replicated else None
    saved_buffers = [(buffer.holder, buffer.key, buffer.holder[buffer.key]) for buffer in buffers]
    record, error, cause = None, None, None
    try:
        record = collapse()
    except Exception as failure:
        error, cause = f"{type(failure).__name__}: {failure}", failure
    errors = agree(error, policy, optimizer)
    if errors and error is None and saved is not None:
        policy, copied = saved
        # in place: the trainer and its learning-rate scheduler hold this optimizer object
        optimizer.param_groups, optimizer.state = copied.param_groups, copied.state
        for holder, key, tensor in saved_buffers:
            holder[key] = tensor
    return policy, None if errors else record, errors, cause
