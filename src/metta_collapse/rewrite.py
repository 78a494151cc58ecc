"""Apply a plan: rewrite the model's parameters in place and carry the optimizer's state (fibration.md §2, §6).

Every map works one axis at a time. With S the 0/1 fiber membership and s the fiber sizes:
  weights        "out" axis: mean over the fiber (D⁻¹Sᵀ W)      "in" axis: sum over the fiber (W S)
  exp_avg (= Eᵀ) "out" axis: sum                              "in" axis: mean
  exp_avg_sq     "out" axis: s² · mean                        "in" axis: mean
  z              like the weights: schedule-free optimizers keep an iterate in parameter space
A random ablation index-selects the kept units on every axis instead, weights and state alike; `keep` with
`fold` (a basis of the activations) sums input columns of dropped units into the kept unit they are labelled with."""

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn

from metta_collapse.cluster import count
from metta_collapse.errors import CollapseError
from metta_collapse.plan import AxisMap, CollapsePlan, StateMap

Quantity = Literal["weight", "first_moment", "second_moment"]
# optimizer state by name (a trailing _<n> dropped): torch's Adam/AdamW/SGD, schedulefree's AdamW/SGD (z),
# heavyball's Muon (nesterov_ema_momentum_1, nested one level under its group index)
STATE_QUANTITIES: dict[str, Quantity] = {
    "exp_avg": "first_moment",
    "momentum_buffer": "first_moment",
    "nesterov_ema_momentum": "first_moment",
    "exp_avg_sq": "second_moment",
    "max_exp_avg_sq": "second_moment",
    "z": "weight",
}


class RecurrentStack(nn.Module):
    """Single-layer LSTMs (or GRUs, RNNs) of different widths standing in for one multi-layer module of that kind.

    Same call as the module it replaces; the state layout differs: each state tensor (h, and c for an LSTM) is
    (1, B, H_1 + ... + H_L), each layer's state concatenated along the last axis, so that `num_layers` (1) and
    `hidden_size` (the sum) still describe the state tensors a caller must pass."""

    def __init__(self, layers: list[nn.RNNBase]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.mode = layers[0].mode
        self.batch_first = layers[0].batch_first
        self.num_layers = 1
        self.hidden_size = sum(layer.hidden_size for layer in layers)
        self.input_size = layers[0].input_size

    def forward(self, x: torch.Tensor, hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None):
        widths = [layer.hidden_size for layer in self.layers]
        lstm = self.mode == "LSTM"
        if hx is None:
            states = [None] * len(widths)
        else:
            states = list(zip(*(s.split(widths, dim=-1) for s in hx), strict=True)) if lstm else hx.split(widths, -1)
        finals = []
        for layer, state in zip(self.layers, states, strict=True):
            x, final = layer(x, state)
            finals.append(final)
        if lstm:
            return x, tuple(torch.cat(parts, dim=-1) for parts in zip(*finals, strict=True))
        return x, torch.cat(finals, dim=-1)


def _segments(labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    index = torch.as_tensor(labels, device=device)
    k = count(labels)
    return index, torch.bincount(index, minlength=k), k


def _reduce(tensor: torch.Tensor, axis: int, labels: np.ndarray, mean: bool) -> torch.Tensor:
    index, sizes, k = _segments(labels, tensor.device)
    shape = list(tensor.shape)
    shape[axis] = k
    total = tensor.new_zeros(shape).index_add_(axis, index, tensor)
    if not mean:
        return total
    view = [1] * tensor.ndim
    view[axis] = k
    return total / sizes.to(tensor.dtype).reshape(view)


def map_collapsed(tensor: torch.Tensor, axes: list[AxisMap], quantity: Quantity) -> torch.Tensor:
    for axis_map in axes:
        labels = axis_map.space.labels()
        out = axis_map.role == "out"
        if quantity == "weight":
            tensor = _reduce(tensor, axis_map.axis, labels, mean=out)
        elif quantity == "first_moment":
            tensor = _reduce(tensor, axis_map.axis, labels, mean=not out)
        else:
            tensor = _reduce(tensor, axis_map.axis, labels, mean=True)
            if out:
                sizes = _segments(labels, tensor.device)[1].to(tensor.dtype)
                view = [1] * tensor.ndim
                view[axis_map.axis] = len(sizes)
                tensor = tensor * (sizes**2).reshape(view)
    return tensor


def map_selected(tensor: torch.Tensor, axes: list[AxisMap], kept: dict, fold: bool = False) -> torch.Tensor:
    """Index-select the kept units on every axis; with `fold`, an input axis instead adds each dropped unit's
    column, times its scale, into the kept unit its label names (what the unit is folded into)."""
    for axis_map in axes:
        if fold and axis_map.role == "in":
            view = [1] * tensor.ndim
            view[axis_map.axis] = axis_map.space.n
            scales = torch.as_tensor(axis_map.space.scales(), dtype=tensor.dtype, device=tensor.device)
            tensor = _reduce(tensor * scales.reshape(view), axis_map.axis, axis_map.space.labels(), mean=False)
            continue
        index = torch.as_tensor(axis_map.space.select(kept.__getitem__), device=tensor.device)
        tensor = tensor.index_select(axis_map.axis, index)
    return tensor


def linked_groups(plan: CollapsePlan) -> dict[str, str]:
    """Each layer's units key -> the key of its group: layers whose outputs meet element-wise keep the same
    units, so a selection is made once per group."""
    root = {key: key for key in plan.units()}

    def find(key: str) -> str:
        while root[key] != key:
            key = root[key]
        return key

    for first, second in plan.links:
        if first.key in root and second.key in root:
            root[find(second.key)] = find(first.key)
    return {key: find(key) for key in root}


def random_selection(plan: CollapsePlan, seed: int) -> dict[str, np.ndarray]:
    """For each layer, as many randomly chosen units as the plan keeps (linked layers choose together)."""
    spaces = plan.units()
    groups = linked_groups(plan)
    generator = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}
    for key in sorted(spaces):
        group = groups[key]
        if group not in chosen:
            space = spaces[group]
            chosen[group] = np.sort(generator.choice(space.n, size=count(space.labels()), replace=False))
        chosen[key] = chosen[group]
    return chosen


def map_state(plan: CollapsePlan, name: str, state: torch.Tensor, kept: dict | None = None) -> torch.Tensor:
    """A recurrent-state tensor fed to input `name`, mapped to the collapsed (or ablated) widths."""
    state_map: StateMap = plan.states[name]
    layers = state.unbind(0) if state_map.layer_axis else [state]
    if len(layers) != len(state_map.spaces):
        raise CollapseError(f"state '{name}' has {len(layers)} layers; the plan expects {len(state_map.spaces)}")
    mapped = []
    for layer, space in zip(layers, state_map.spaces, strict=True):
        axes = [AxisMap(layer.ndim - 1, "out", space)]
        mapped.append(map_selected(layer, axes, kept) if kept is not None else map_collapsed(layer, axes, "weight"))
    if state_map.stacked:
        return torch.cat(mapped, dim=-1).unsqueeze(0)
    return torch.stack(mapped) if state_map.layer_axis else mapped[0]


# ----- model rewrite


def _tensor(model: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor]:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module, attribute, getattr(module, attribute)


def _check(model: nn.Module, plan: CollapsePlan) -> None:
    for param in plan.params.values():
        try:
            tensor = _tensor(model, param.name)[2]
        except AttributeError:
            raise CollapseError(f"the plan maps '{param.name}', which this model does not have") from None
        if tuple(tensor.shape) != param.shape:
            raise CollapseError(
                f"the plan was made for another model: '{param.name}' is {tuple(tensor.shape)}, the plan expects "
                f"{param.shape} (already collapsed?)"
            )


def _rewrite(model: nn.Module, plan: CollapsePlan, kept: dict | None) -> dict[str, tuple[str, torch.Tensor]]:
    """Replace every mapped tensor; returns {old name: (new name, old tensor)}."""
    replaced = {}
    with torch.no_grad():
        for param in plan.params.values():
            module, attribute, old = _tensor(model, param.name)
            new = (
                map_selected(old, param.axes, kept, plan.fold)
                if kept is not None
                else map_collapsed(old, param.axes, "weight")
            )
            if isinstance(old, nn.Parameter):
                setattr(module, attribute, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
            else:
                module._buffers[attribute] = new.contiguous()
            replaced[param.name] = (param.new_name, old)
    for module_name, action in plan.modules.items():
        module = model.get_submodule(module_name)
        _resize(module)
        if action == "stack":
            _replace(model, module_name, _split_recurrent(module))
    return replaced


def _resize(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (new) parameter shapes."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.out_channels if depthwise else module.weight.shape[1] * module.groups
        if depthwise:
            module.groups = module.out_channels
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        module.num_features = (module.weight if module.affine else module.running_mean).shape[0]
    elif isinstance(module, nn.RNNBase):
        module.input_size = module.weight_ih_l0.shape[1]
        module.hidden_size = module.weight_hh_l0.shape[1]
        module._init_flat_weights()


def _split_recurrent(module: nn.RNNBase) -> RecurrentStack:
    extra = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}
    layers = []
    for index in range(module.num_layers):
        weight_hh = getattr(module, f"weight_hh_l{index}")
        layer = type(module)(
            getattr(module, f"weight_ih_l{index}").shape[1],
            weight_hh.shape[1],
            bias=module.bias,
            batch_first=module.batch_first,
            device=weight_hh.device,
            dtype=weight_hh.dtype,
            **extra,
        )
        for name in layer._flat_weights_names:
            setattr(layer, name, getattr(module, name.replace("_l0", f"_l{index}")))
        layer.dropout = module.dropout if index < module.num_layers - 1 else 0.0
        layer.train(module.training)
        layers.append(layer)
    return RecurrentStack(layers)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, new)


# ----- optimizer


def _remap(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    plan: CollapsePlan,
    replaced: dict[str, tuple[str, torch.Tensor]],
    kept: dict | None,
    reset: bool = False,
) -> None:
    """Give the optimizer the new parameter objects and their mapped state (or none: `reset`), matched by
    parameter name."""
    by_name = {param.name: param for param in plan.params.values()}
    updates = {}
    for name, (new_name, old) in replaced.items():
        if not isinstance(old, nn.Parameter):
            continue
        new = model.get_parameter(new_name)
        mapped = {} if reset else _map_state(optimizer.state.get(old, {}), name, old, by_name[name].axes, kept)
        updates[old] = (new, mapped)
    for group in optimizer.param_groups:
        group["params"] = [updates[p][0] if p in updates else p for p in group["params"]]
    for old, (new, mapped) in updates.items():
        if old in optimizer.state:
            del optimizer.state[old]
            optimizer.state[new] = mapped


def _map_state(state: dict, name: str, old: torch.Tensor, axes: list[AxisMap], kept: dict | None) -> dict:
    mapped = {}
    for key, value in state.items():
        if isinstance(value, dict):
            mapped[key] = _map_state(value, name, old, axes, kept)
        elif not isinstance(value, torch.Tensor) or value.shape != old.shape or value.ndim == 0:
            mapped[key] = value  # step counters and other scalars are copied
        elif kept is not None:
            mapped[key] = map_selected(value, axes, kept)
        elif (quantity := STATE_QUANTITIES.get(str(key).rstrip("0123456789").removesuffix("_"))) is not None:
            mapped[key] = map_collapsed(value, axes, quantity)
        else:
            raise CollapseError(
                f"optimizer state '{key}' of '{name}' has no known collapse map (supported: "
                f"{sorted(STATE_QUANTITIES)}); collapse.optimizer_state=reset starts the optimizer afresh"
            )
    return mapped


@contextlib.contextmanager
def transaction(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Undo every change to the model's modules and the optimizer if the body raises.

    Rewrites only rebind attributes to new tensors and modules, never write into existing tensors, so
    shallow copies of each module's attribute dictionaries restore it exactly."""
    saved = [
        (module, {k: (v.copy() if isinstance(v, dict | list) else v) for k, v in vars(module).items()})
        for module in (model.modules() if model is not None else [])
    ]
    groups = [list(group["params"]) for group in optimizer.param_groups] if optimizer is not None else []
    state = dict(optimizer.state) if optimizer is not None else {}
    try:
        yield
    except BaseException:
        for module, attributes in saved:
            vars(module).clear()
            vars(module).update(attributes)
        if optimizer is not None:
            for group, params in zip(optimizer.param_groups, groups, strict=True):
                group["params"] = params
            optimizer.state.clear()
            optimizer.state.update(state)
        raise


def _apply(model: nn.Module, plan: CollapsePlan, optimizer: torch.optim.Optimizer | None, kept: dict | None):
    _check(model, plan)
    with transaction(model, optimizer):
        replaced = _rewrite(model, plan, kept)
        if optimizer is not None:
            _remap(optimizer, model, plan, replaced, kept)
    plan.replaced = replaced
    return model


def collapse(model: nn.Module, plan: CollapsePlan, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Merge every fiber of the plan in place; with `optimizer`, also carry its state — all or nothing."""
    return _apply(model, plan, optimizer, None)


def remap_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, plan: CollapsePlan, reset: bool = False
) -> None:
    """Carry Adam/AdamW (or SGD momentum) state to a model that `collapse` or `ablate` has rewritten with
    `plan`; `reset` gives the new parameters fresh state instead."""
    replaced = plan.replaced
    if replaced is None:
        raise CollapseError("remap_optimizer needs a plan that collapse() or ablate() has applied to the model")
    with transaction(None, optimizer):
        _remap(optimizer, model, plan, replaced, plan.kept, reset)


def ablate(
    model: nn.Module, plan: CollapsePlan, seed: int = 0, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """The random-ablation null model, in place: every layer cut to the plan's width, keeping randomly chosen
    units with their trained weights (and optimizer state, index-selected)."""
    return keep(model, plan, random_selection(plan, seed), optimizer, fold=False)


def keep(
    model: nn.Module,
    plan: CollapsePlan,
    kept: dict[str, np.ndarray],
    optimizer: torch.optim.Optimizer | None = None,
    fold: bool = True,
) -> nn.Module:
    """Cut every layer to the units `kept[key]` (sorted indices; widths as the plan's), in place: trained weights
    and optimizer state index-selected, all or nothing. With `fold`, each dropped unit's outgoing weights are
    added to those of the kept unit the plan labels it with (as `select_basis` does), an exact merge where it
    is a copy of that unit."""
    plan.fold = fold
    _apply(model, plan, optimizer, kept)
    plan.kept = kept
    return model


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Fresh weights at the model's current widths (the "small architecture from scratch" null model)."""
    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model
