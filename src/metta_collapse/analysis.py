"""`analyze`: propagate colors through the graph and build the collapse plan (fibration.md §1-5).

`_ColorPass` is an `fx.Interpreter` that runs the model on example inputs and carries, beside each tensor,
the `Space` of its feature axis, the way `torch.fx.passes.shape_prop.ShapeProp` carries shapes. Layers
cluster their units; element-wise ops pass colors; ops joining two colored tensors, sinks and barriers
*demand* that upstream layers split their fibers further, and passes repeat until nothing changes."""

import operator
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from metta_collapse.activations import recurrent_layers
from metta_collapse.cluster import canonical, count, exact_partition, linkage_partition
from metta_collapse.config import CollapseConfig, ModelSpec
from metta_collapse.errors import CollapseError
from metta_collapse.graph import as_graph
from metta_collapse.plan import (
    GATES,
    AxisMap,
    CollapsePlan,
    Distinct,
    Flattened,
    Gated,
    Joined,
    LayerPlan,
    ParamMap,
    Space,
    StateMap,
    Units,
)


@dataclass
class Colored:
    space: Space
    axis: int


@dataclass
class StateTag:
    """A recurrent-state input on its way to a recurrent layer."""

    name: str
    ndim: int


@dataclass
class ParamRef:
    name: str


@dataclass
class PerLayer:
    """h_n (c_n) of a multi-layer LSTM or GRU: layer i along axis 0 with its own hidden space on the last axis."""

    spaces: list[Space]


@dataclass
class _Layer:
    name: str
    kind: str
    units: list[Units]
    params: list[tuple[str, list[AxisMap]]]
    module: str | None = None


@dataclass
class _Binding:
    input: str
    module: str
    layer_axis: bool


UNARY_MODULES = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Dropout,
    nn.Identity,
)
UNARY_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.square,
    F.relu,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.mish,
    F.relu6,
    F.hardtanh,
    F.dropout,
    operator.neg,
    torch.clone,
    torch.detach,
}
UNARY_METHODS = {
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "abs",
    "neg",
    "square",
    "float",
    "double",
    "half",
    "to",
    "type",
    "contiguous",
    "detach",
    "clone",
    "cpu",
    "cuda",
}
BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    "add",
    "sub",
    "mul",
    "div",
}
MATMUL = {operator.matmul, torch.matmul, "matmul"}
SHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.movedim,
}
SHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "permute",
    "t",
    "expand",
    "unflatten",
    "movedim",
    "repeat",
}
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
TRANSPOSES = {"T", "mT"}
SHAPE_QUERIES = {"size", "dim", "numel"}
# Normalisations over features count duplicated units, so they stay full width (fibration.md §4).
KNOWN_BARRIERS = {
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Softmax,
    nn.LogSoftmax,
    F.layer_norm,
    F.group_norm,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    "softmax",
    "log_softmax",
}
# act on each channel's map alone (the channels on axis 1), so a channel's copies stay copies
PER_CHANNEL = {
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _flat(structure: Any) -> list:
    if isinstance(structure, tuple | list):
        return [leaf for item in structure for leaf in _flat(item)]
    if isinstance(structure, dict):
        return [leaf for item in structure.values() for leaf in _flat(item)]
    return [structure]


def _aggregate_columns(weight: torch.Tensor, labels: np.ndarray | None) -> np.ndarray:
    """W S: the sum of each row's weights over every input fiber (columns = dim 1)."""
    weight = weight.detach().to("cpu", torch.float64)
    if labels is None:
        return weight.numpy()
    index = torch.as_tensor(labels)
    shape = (weight.shape[0], count(labels), *weight.shape[2:])
    return torch.zeros(shape, dtype=torch.float64).index_add_(1, index, weight).numpy()


def _rows(*blocks: np.ndarray | None) -> np.ndarray:
    present = [b.reshape(len(b), -1) for b in blocks if b is not None]
    return np.concatenate(present, axis=1)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


class _Analysis:
    def __init__(self, model: nn.Module, graph: fx.GraphModule, config: CollapseConfig, spec: ModelSpec):
        self.model, self.graph, self.config, self.spec = model, graph, config, spec
        self.demands: dict[str, np.ndarray] = {}
        self.previous: dict[str, np.ndarray] = {}
        self.cache: dict[tuple, np.ndarray] = {}
        self.roles = self._output_roles()
        self.reused = self._reused_targets()

    # ----- bookkeeping across passes

    def _output_roles(self) -> dict[fx.Node, set[str]]:
        output = next(node for node in self.graph.graph.nodes if node.op == "output")
        roles: dict[fx.Node, set[str]] = {}
        for index, leaf in enumerate(_flat(output.args[0])):
            if isinstance(leaf, fx.Node):
                roles.setdefault(leaf, set()).add(self.spec.output(index))
        for node in reversed(list(self.graph.graph.nodes)):
            for user in node.users:
                roles.setdefault(node, set()).update(roles.get(user, set()))
        return roles

    def _reused_targets(self) -> set[str]:
        seen: dict[str, int] = {}
        for node in self.graph.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                seen[node.target] = seen.get(node.target, 0) + len(node.users if node.op == "get_attr" else [1])
        return {target for target, uses in seen.items() if uses > 1}

    def demand(self, key: str, labels: np.ndarray) -> None:
        old = self.demands.get(key)
        new = canonical(labels) if old is None else canonical(old, labels)
        if old is None or count(new) != count(old):
            self.demands[key] = new
            self.changed = True

    def link(self, first: Space, second: Space) -> None:
        """Layers whose outputs meet element-wise: a random ablation must keep the same units in both."""
        if isinstance(first, Units) and isinstance(second, Units) and first is not second:
            self.links.append((first, second))

    def threshold_kind(self, node: fx.Node, kind: str) -> str:
        return "critic" if self.roles.get(node) == {"value"} else kind

    def partition(self, rows: np.ndarray, kind: str) -> np.ndarray:
        threshold = getattr(self.config.thresholds, kind)
        if self.config.metric == "exact" or threshold == 0:
            return exact_partition(rows, self.config.tolerance)
        return linkage_partition(rows, threshold, self.config.metric)

    def units(self, key: str, kind: str, rows: Callable[[], np.ndarray], signature: tuple) -> Units:
        cached = self.cache.get((key, *signature))
        if cached is None:
            cached = self.cache[(key, *signature)] = self.partition(rows(), kind)
        partition = canonical(cached, *[x for x in (self.demands.get(key), self.previous.get(key)) if x is not None])
        self.current[key] = partition
        return Units(key, len(partition), partition)

    # ----- passes

    def run(self, inputs: tuple) -> CollapsePlan:
        for _ in range(1000):
            self.changed = False
            self.current: dict[str, np.ndarray] = {}
            self.layers: list[_Layer] = []
            self.bindings: list[_Binding] = []
            self.links: list[tuple[Units, Units]] = []
            self.warnings: list[str] = []
            self.sources: dict[str, tuple] = {}
            color_pass = _ColorPass(self)
            color_pass.run(*inputs)
            stable = all(count(p) == count(self.previous.get(k, np.zeros(0))) for k, p in self.current.items())
            self.previous = self.current
            if stable and not self.changed:
                for node, meta in color_pass.meta.items():  # a layer's activations: the last tensor in its units
                    key = meta.space.key if isinstance(meta, Colored) and isinstance(meta.space, Units) else None
                    if key is not None and self.sources.get(key, ("node",))[0] == "node":
                        self.sources[key] = ("node", node.name, meta.axis)
                return self.plan()
        raise CollapseError("color refinement did not converge")  # refinement is monotone: cannot happen

    def barrier(self, node: fx.Node, metas: Any, known: bool = False) -> None:
        for meta in _flat(metas):
            if isinstance(meta, Colored):
                meta.space.refine(np.arange(meta.space.n), self.demand)
            elif isinstance(meta, PerLayer):
                for space in meta.spaces:
                    space.refine(np.arange(space.n), self.demand)
        if known or not any(isinstance(m, Colored | PerLayer) for m in _flat(metas)):
            return
        what = _describe(node, self.graph)
        if self.config.strict:
            raise CollapseError(f"node '{node.name}' ({what}) is not supported by the collapse engine (strict mode)")
        message = f"node '{node.name}' ({what}) is not supported: treated as a barrier, its inputs keep their width"
        if message not in self.warnings:
            self.warnings.append(message)

    # ----- plan

    def plan(self) -> CollapsePlan:
        for message in self.warnings:
            warnings.warn(message, stacklevel=3)
        recurrent_layers = {
            layer.module: [units.key for units in layer.units]
            for layer in self.layers
            if len(layer.units) > 1 and isinstance(self.model.get_submodule(layer.module or ""), nn.RNNBase)
        }
        params: dict[str, ParamMap] = {}
        modules: dict[str, str] = {}
        layers: list[LayerPlan] = []
        for layer in self.layers:
            for units in layer.units:
                name = units.key if len(layer.units) == 1 else units.key.replace(".h", ".l")
                layers.append(
                    LayerPlan(name, layer.kind, units.n, count(units.partition), units.partition.tolist(), units.key)
                )
            if layer.module is not None:
                modules[layer.module] = "resize"
            for name, axes in layer.params:
                changing = [a for a in axes if count(a.space.labels()) != a.space.n]
                if not changing:
                    continue
                shape = (
                    tuple(self.graph.get_parameter(name).shape)
                    if _is_param(self.graph, name)
                    else tuple(self.graph.get_buffer(name).shape)
                )
                params[name] = ParamMap(name, name, shape, changing, buffer=not _is_param(self.graph, name))
        states = {b.input: StateMap(self._state_spaces(b.module), b.layer_axis, False, b.module) for b in self.bindings}
        before = sum(p.numel() for p in self.model.parameters())
        plan = CollapsePlan(layers, before, before, params, modules, states, self.links, list(self.warnings))
        plan.sources, plan.recurrent_layers = self.sources, recurrent_layers
        plan.relabel({})
        return plan

    def _state_spaces(self, module: str) -> list[Space]:
        return next(layer.units for layer in self.layers if layer.module == module)


def _is_param(graph: fx.GraphModule, name: str) -> bool:
    module_name, _, attribute = name.rpartition(".")
    return attribute in graph.get_submodule(module_name)._parameters


def _describe(node: fx.Node, graph: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(graph.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"


class _ColorPass(fx.Interpreter):
    def __init__(self, analysis: _Analysis):
        super().__init__(analysis.graph)
        self.a = analysis
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        metas = fx.node.map_arg(node.args, lambda n: self.meta[n])
        self.meta[node] = self.color(node, value, args, kwargs, metas)
        return value

    # ----- dispatch

    def color(self, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
        a = self.a
        if node.op == "placeholder":
            return self.placeholder_meta(node, value)
        if node.op == "get_attr":
            return ParamRef(node.target)
        if node.op == "output":
            for index, (meta, _) in enumerate(zip(_flat(metas[0]), _flat(args[0]), strict=False)):
                if a.spec.output(index) != "state":
                    a.barrier(node, meta, known=True)
            return None
        target = node.target
        if node.op == "call_module":
            module = a.graph.get_submodule(target)
            if target in a.reused and any(True for _ in [*module.parameters(), *module.buffers()]):
                return a.barrier(node, metas)  # one set of weights, two places in the graph
            rule = next((RULES[cls] for cls in type(module).__mro__ if cls in RULES), None)
            return rule(self, node, value, args, kwargs, metas) if rule is not None else a.barrier(node, metas)
        if target is operator.getitem and isinstance(metas[0], tuple | list):
            return metas[0][args[1]]
        if target in SHAPE_QUERIES or (target is getattr and not isinstance(value, torch.Tensor)):
            return None
        if not any(isinstance(m, Colored | PerLayer | StateTag) for m in _flat(metas)):
            return None
        if target is getattr and args[1] in TRANSPOSES:
            return self.reshaped(node, metas[0], lambda probe: getattr(probe, args[1]), args[0], value)
        rule = RULES.get(target) if isinstance(target, Hashable) else None
        return rule(self, node, value, args, kwargs, metas) if rule is not None else a.barrier(node, metas)

    def placeholder_meta(self, node: fx.Node, value: Any) -> Any:
        role = self.a.spec.input(node.target)
        if role.role == "state":
            return StateTag(node.target, value.ndim)
        if role.role == "index" or not isinstance(value, torch.Tensor):
            return None
        axis = role.axis % value.ndim if value.ndim else 0
        if not -value.ndim <= role.axis < max(value.ndim, 1):
            raise CollapseError(f"input '{node.target}' has shape {tuple(value.shape)}: no feature axis {role.axis}")
        return Colored(Distinct(value.shape[axis]), axis)

    # ----- layers

    def linear(self, node, key, weight, bias, x_meta, x, value, weight_axes, bias_name, module=None):
        """A layer z = W x + b whose units are W's rows; `weight_axes` = (name, out axis, in axis) of W."""
        a = self.a
        if isinstance(x_meta, Colored) and x_meta.axis != x.ndim - 1:
            return a.barrier(node, [x_meta])
        inputs = x_meta.space if isinstance(x_meta, Colored) else None
        labels = inputs.labels() if inputs is not None else None
        kind = a.threshold_kind(node, "linear")
        units = a.units(
            key,
            kind,
            lambda: _rows(_aggregate_columns(weight, labels), None if bias is None else _numpy(bias)[:, None]),
            (kind, None if labels is None else labels.tobytes()),
        )
        name, out_axis, in_axis = weight_axes
        params = [(name, [AxisMap(out_axis, "out", units)] + ([AxisMap(in_axis, "in", inputs)] if inputs else []))]
        if bias is not None:
            params.append((bias_name, [AxisMap(0, "out", units)]))
        a.layers.append(_Layer(key, kind, [units], params, module))
        return Colored(units, value.ndim - 1)

    def contraction(self, node, metas, args, kwargs, value):
        """x @ W, F.linear(x, W, b) and two-operand einsum with one weight parameter: a linear layer."""
        a = self.a
        if node.target is F.linear:
            weight, bias = args[1], (args[2] if len(args) > 2 else kwargs.get("bias"))
            names = metas[1:3] if len(metas) > 2 else (metas[1], ParamRef(None) if bias is None else None)
            if not isinstance(names[0], ParamRef) or (bias is not None and not isinstance(names[1], ParamRef)):
                return a.barrier(node, metas)
            if names[0].name in a.reused:
                return a.barrier(node, metas)
            return self.linear(
                node,
                names[0].name,
                weight,
                bias,
                metas[0],
                args[0],
                value,
                (names[0].name, 0, 1),
                names[1].name if bias is not None else None,
            )
        if node.target is torch.einsum:
            equation, operands, operand_metas = args[0].replace(" ", ""), args[1:], metas[1:]
        else:
            equation, operands, operand_metas = "...i,io->...o", args, metas
        if len(operands) == 2 and not any(isinstance(m, ParamRef) for m in operand_metas):
            return a.barrier(node, metas, known=True)  # two activations, e.g. bilinear scoring: both keep width
        if len(operands) != 2 or not isinstance(operand_metas[1], ParamRef) or operands[1].ndim != 2:
            return a.barrier(node, metas)
        weight_name = operand_metas[1].name
        lhs, output = equation.split("->")
        x_subscripts, w_subscripts = lhs.split(",")
        x_meta, x = operand_metas[0], operands[0]
        if isinstance(x_meta, Colored) and x_meta.axis != x.ndim - 1:
            return a.barrier(node, metas)
        feature = x_subscripts[-1]
        if feature not in w_subscripts or feature in output or weight_name in a.reused:
            return a.barrier(node, metas)
        unit = w_subscripts.replace(feature, "")
        if len(unit) != 1 or not output.endswith(unit):
            return a.barrier(node, metas)
        in_axis, out_axis = w_subscripts.index(feature), w_subscripts.index(unit)
        weight = operands[1] if out_axis == 0 else operands[1].T
        return self.linear(node, weight_name, weight, None, x_meta, x, value, (weight_name, out_axis, in_axis), None)

    def conv(self, node, key, module, x_meta, x, value):
        a = self.a
        spatial = module.weight.ndim - 2
        if isinstance(x_meta, Colored) and x_meta.axis != x.ndim - spatial - 1:
            return a.barrier(node, [x_meta])
        inputs = x_meta.space if isinstance(x_meta, Colored) else None
        kind = a.threshold_kind(node, "cnn")
        bias = None if module.bias is None else _numpy(module.bias)[:, None]
        channel_axis = value.ndim - spatial - 1
        if module.groups == 1:
            labels = inputs.labels() if inputs is not None else None
            units = a.units(
                key,
                kind,
                lambda: _rows(_aggregate_columns(module.weight, labels), bias),
                (kind, None if labels is None else labels.tobytes()),
            )
            params = [(f"{key}.weight", [AxisMap(0, "out", units)] + ([AxisMap(1, "in", inputs)] if inputs else []))]
            if module.bias is not None:
                params.append((f"{key}.bias", [AxisMap(0, "out", units)]))
            a.layers.append(_Layer(key, kind, [units], params, key))
            return Colored(units, channel_axis)
        if module.groups == module.in_channels == module.out_channels:  # depthwise: one channel in, one out
            space = inputs or Distinct(module.in_channels)
            own = a.partition(_rows(_numpy(module.weight), bias), kind)
            space.refine(canonical(space.labels(), own), a.demand)
            params = [
                (f"{key}.{p}", [AxisMap(0, "out", space)]) for p in ("weight", "bias") if getattr(module, p) is not None
            ]
            a.layers.append(_Layer(key, kind, [], params, key))
            return Colored(space, channel_axis)
        return a.barrier(node, [x_meta])

    def embedding(self, node, key, module, value):
        a = self.a
        kind = a.threshold_kind(node, "linear")
        units = a.units(key, kind, lambda: _numpy(module.weight).T, (kind,))
        a.layers.append(_Layer(key, kind, [units], [(f"{key}.weight", [AxisMap(1, "out", units)])], key))
        return Colored(units, value.ndim - 1)

    def batchnorm(self, node, key, module, x_meta):
        if not isinstance(x_meta, Colored) or x_meta.axis != 1:
            return self.a.barrier(node, [x_meta])
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n) is not None]
        per_channel = np.stack([_numpy(getattr(module, n)) for n in names], axis=1) if names else None
        if per_channel is not None:
            groups = exact_partition(per_channel, self.a.config.tolerance)
            x_meta.space.refine(canonical(x_meta.space.labels(), groups), self.a.demand)
        params = [(f"{key}.{n}", [AxisMap(0, "out", x_meta.space)]) for n in names]
        self.a.layers.append(_Layer(key, "batchnorm", [], params, key))
        return x_meta

    def recurrent(self, node, key, module: nn.RNNBase, metas, args, value):
        """An LSTM, GRU or RNN of any depth: per layer, the hidden units that stay copies at every step."""
        a = self.a
        x_meta, x = metas[0], args[0]
        if module.proj_size or module.bidirectional or (isinstance(x_meta, Colored) and x_meta.axis != x.ndim - 1):
            return a.barrier(node, metas)
        if any(isinstance(m, Colored | PerLayer) for m in _flat(metas[1:])):
            return a.barrier(node, metas)  # a state computed from features would have to follow the layer's fibers
        kind = a.threshold_kind(node, "lstm")
        inputs = x_meta.space if isinstance(x_meta, Colored) else None
        hidden = module.hidden_size
        spaces: list[Units] = []
        params = []
        for layer in range(module.num_layers):
            layer_key = key if module.num_layers == 1 else f"{key}.h{layer}"
            labels = inputs.labels() if inputs is not None else None
            weights = recurrent_layers(module)[layer]
            w_ih = _aggregate_columns(weights["weight_ih"], labels)
            start = canonical(
                np.zeros(hidden, dtype=np.int64),
                *[x for x in (a.demands.get(layer_key), a.previous.get(layer_key)) if x is not None],
            )
            signature = (kind, None if labels is None else labels.tobytes(), start.tobytes())
            partition = a.cache.get((layer_key, *signature))
            if partition is None:
                partition = a.cache[(layer_key, *signature)] = self.recurrent_fixed_point(
                    module.mode, w_ih, weights, start, kind
                )
            a.current[layer_key] = partition
            a.sources[layer_key] = ("recurrent", key, layer)
            units = Units(layer_key, hidden, partition)
            gates = Gated(units, GATES[module.mode])
            params.append(
                (
                    f"{key}.weight_ih_l{layer}",
                    [AxisMap(0, "out", gates)] + ([AxisMap(1, "in", inputs)] if inputs is not None else []),
                )
            )
            params.append((f"{key}.weight_hh_l{layer}", [AxisMap(0, "out", gates), AxisMap(1, "in", units)]))
            if module.bias:
                params += [(f"{key}.bias_{side}_l{layer}", [AxisMap(0, "out", gates)]) for side in ("ih", "hh")]
            spaces.append(units)
            inputs = units
        a.layers.append(_Layer(key, kind, spaces, params, key))
        state_metas = metas[1] if len(metas) > 1 else ()
        state_values = args[1] if len(args) > 1 else ()
        if module.mode != "LSTM":
            state_metas, state_values = (state_metas,), (state_values,)
        for meta, state in zip(state_metas, state_values, strict=False):
            if isinstance(meta, StateTag):
                a.bindings.append(_Binding(meta.name, key, layer_axis=meta.ndim == state.ndim))
        output, h_n = value[0], value[1][0] if module.mode == "LSTM" else value[1]
        state_meta = Colored(spaces[0], h_n.ndim - 1) if len(spaces) == 1 else PerLayer(list(spaces))
        return Colored(spaces[-1], output.ndim - 1), (state_meta, state_meta) if module.mode == "LSTM" else state_meta

    def recurrent_fixed_point(self, mode: str, w_ih: np.ndarray, weights: dict, start: np.ndarray, kind: str):
        """Refine the hidden partition until every gate's rows agree within each fiber (fibration.md §5). For an
        LSTM the cell state's fibers are the hidden ones: c' = f c + i g and h = o tanh(c) need i, f, g, o to
        agree. A gate's bias is b_ih + b_hh, except a GRU's n gate, whose b_hn is multiplied by r."""
        size = len(start)
        bias_ih, bias_hh = (_numpy(weights[n])[:, None] if n in weights else None for n in ("bias_ih", "bias_hh"))
        hidden = start
        while True:
            rows = _rows(w_ih, _aggregate_columns(weights["weight_hh"], hidden))
            partitions = []
            for gate in range(GATES[mode]):
                block = slice(gate * size, (gate + 1) * size)
                if bias_ih is None:
                    biases = []
                elif mode == "GRU" and gate == 2:
                    biases = [bias_ih[block], bias_hh[block]]
                else:
                    biases = [bias_ih[block] + bias_hh[block]]
                partitions.append(self.a.partition(_rows(rows[block], *biases), kind))
            new_hidden = canonical(hidden, *partitions)
            if count(new_hidden) == count(hidden):
                return hidden
            hidden = new_hidden

    # ----- colored tensors

    def binary(self, node, metas, args, value):
        """Element-wise op of two tensors: colors pair up; both producers must split to the common refinement."""
        a = self.a
        if not any(isinstance(m, Colored) for m in metas[:2]) and any(isinstance(m, StateTag) for m in metas[:2]):
            return next(m for m in metas[:2] if isinstance(m, StateTag))  # e.g. a state reset by a done mask
        if not isinstance(value, torch.Tensor):
            return a.barrier(node, metas)
        aligned = []
        for meta, arg in zip(metas[:2], args[:2], strict=False):
            if isinstance(meta, Colored):
                aligned.append((meta, meta.axis + value.ndim - arg.ndim))
        axes = {axis for _, axis in aligned}
        if len(axes) != 1 or len({m.space.n for m, _ in aligned}) != 1:
            return a.barrier(node, metas)
        (axis,) = axes
        first = aligned[0][0]
        labels = canonical(*[m.space.labels() for m, _ in aligned])
        for meta, arg in zip(metas[:2], args[:2], strict=False):
            if isinstance(meta, Colored) or not isinstance(arg, torch.Tensor):
                continue
            offset = axis - (value.ndim - arg.ndim)
            if offset < 0 or arg.shape[offset] == 1:
                continue  # broadcast along the feature axis: the same for every unit
            if (
                not isinstance(meta, ParamRef)
                or meta.name in a.reused
                or arg.ndim - offset != 1
                and any(s != 1 for s in arg.shape[offset + 1 :])
            ):
                return a.barrier(node, metas)
            per_unit = _numpy(arg.reshape(*arg.shape[:offset], arg.shape[offset]).reshape(-1, arg.shape[offset]).T)
            labels = canonical(labels, exact_partition(per_unit, a.config.tolerance))
            a.layers.append(_Layer(meta.name, "parameter", [], [(meta.name, [AxisMap(offset, "out", first.space)])]))
        for meta, _ in aligned:
            meta.space.refine(labels, a.demand)
        if len(aligned) == 2:
            a.link(aligned[0][0].space, aligned[1][0].space)
        return Colored(first.space, axis)

    def concat(self, node, metas, args, kwargs, value):
        a = self.a
        tensors, tensor_metas = args[0], metas[0]
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % value.ndim
        colored = [m for m in tensor_metas if isinstance(m, Colored)]
        if not colored or any(isinstance(m, PerLayer | StateTag) for m in tensor_metas):
            return a.barrier(node, metas)
        if any(m.axis != colored[0].axis for m in colored):
            return a.barrier(node, metas)
        axis = colored[0].axis
        if dim == axis:
            parts = [
                m.space if isinstance(m, Colored) else Distinct(t.shape[dim])
                for m, t in zip(tensor_metas, tensors, strict=True)
            ]
            return Colored(Joined(parts), axis)
        if len(colored) != len(tensors) or len({m.space.n for m in colored}) != 1:
            return a.barrier(node, metas)
        labels = canonical(*[m.space.labels() for m in colored])
        for meta in colored:
            meta.space.refine(labels, a.demand)
            a.link(colored[0].space, meta.space)
        return Colored(colored[0].space, axis)

    def reshaped(self, node, meta, apply: Callable, x, value):
        """Data-movement ops: run the op on a probe holding each element's feature index, then read where the
        feature axis went (kept whole: same space; merged with the axes after it: flattened; else barrier)."""
        if isinstance(meta, StateTag):
            return meta
        if isinstance(meta, PerLayer) and node.target is operator.getitem and isinstance(node.args[1], int):
            space = meta.spaces[node.args[1]]
            return Colored(space, value.ndim - 1)
        if not isinstance(meta, Colored) or not isinstance(value, torch.Tensor):
            return self.a.barrier(node, [meta])
        n = meta.space.n
        shape = [1] * x.ndim
        shape[meta.axis] = n
        probe = torch.arange(n, dtype=torch.float64).reshape(shape).expand(x.shape).contiguous()
        result = apply(probe)
        for axis in range(result.ndim):
            line = result.movedim(axis, -1).reshape(-1, result.shape[axis])[0]
            if not torch.equal(
                result, line.reshape([-1 if d == axis else 1 for d in range(result.ndim)]).expand(result.shape)
            ):
                continue
            if torch.equal(line, torch.arange(n, dtype=torch.float64)):
                return Colored(meta.space, axis)
            if len(line) % n == 0 and torch.equal(
                line, torch.arange(n, dtype=torch.float64).repeat_interleave(len(line) // n)
            ):
                return Colored(Flattened(meta.space, len(line) // n), axis)
        return self.a.barrier(node, [meta])


def analyze(
    model: nn.Module,
    example_inputs: Any,
    config: CollapseConfig | None = None,
    spec: ModelSpec | None = None,
    graph: fx.GraphModule | None = None,
) -> CollapsePlan:
    """Find the units of `model` that compute the same thing on `example_inputs` and plan their merge.

    Pure: the model runs in eval mode without gradients; its mode and buffers are restored. `graph` is the
    model's graph when fx cannot trace it (see `chain_graph`)."""
    config = config or CollapseConfig()
    spec = spec or ModelSpec()
    inputs = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CollapseError(f"parameter '{name}' holds NaN or infinite values")
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CollapseError(f"example input {index} holds NaN or infinite values")
    gm = as_graph(model, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(spec.inputs) - {n.target for n in placeholders}
    if unknown:
        raise CollapseError(
            f"spec names inputs {sorted(unknown)}; the model's inputs are {[n.target for n in placeholders]}"
        )
    modes = {module: module.training for module in model.modules()}
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    model.eval()
    try:
        with torch.no_grad():
            return _Analysis(model, gm, config, spec).run(inputs)
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for name, tensor in model.named_buffers():
                tensor.copy_(buffers[name])


# ----- the rules: how each kind of operation colors its output (a module class, a function, a method's name)

Rule = Callable[[_ColorPass, fx.Node, Any, tuple, dict, tuple], Any]


def pass_colors(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    """Element-wise on its first input: the output has that input's colors."""
    return metas[0]


def per_channel(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    """Acts on each channel (axis 1) alone, e.g. pooling: colors pass when the features are the channels."""
    meta = metas[0]
    if isinstance(meta, Colored) and meta.axis == 1 and isinstance(value, torch.Tensor) and value.ndim > 1:
        return Colored(meta.space, 1)
    return p.a.barrier(node, metas)


def known_barrier(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    """Mixes every feature (e.g. a normalisation): its inputs keep their width, without a warning."""
    return p.a.barrier(node, metas, known=True)


def _module(p: _ColorPass, node: fx.Node) -> nn.Module:
    return p.a.graph.get_submodule(node.target)


def _linear(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    module, key = _module(p, node), node.target
    return p.linear(
        node, key, module.weight, module.bias, metas[0], args[0], value, (f"{key}.weight", 0, 1), f"{key}.bias", key
    )


def _embedding(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    module = _module(p, node)
    return p.embedding(node, node.target, module, value) if module.max_norm is None else p.a.barrier(node, metas)


def _reshape(p: _ColorPass, node: fx.Node, value: Any, args: tuple, kwargs: dict, metas: tuple) -> Any:
    target = node.target
    if node.op == "call_module":
        apply = _module(p, node)
    elif node.op == "call_method":
        apply = lambda probe: getattr(probe, target)(*args[1:], **kwargs)  # noqa: E731
    else:
        apply = lambda probe: target(probe, *args[1:], **kwargs)  # noqa: E731
    return p.reshaped(node, metas[0], apply, args[0], value)


RULES: dict[Any, Rule] = {
    nn.Linear: _linear,
    **dict.fromkeys(
        CONVS,
        lambda p, node, value, args, kwargs, metas: p.conv(
            node, node.target, _module(p, node), metas[0], args[0], value
        ),
    ),
    nn.RNNBase: lambda p, node, value, args, kwargs, metas: p.recurrent(
        node, node.target, _module(p, node), metas, args, value
    ),
    nn.Embedding: _embedding,
    **dict.fromkeys(
        BATCHNORMS,
        lambda p, node, value, args, kwargs, metas: p.batchnorm(node, node.target, _module(p, node), metas[0]),
    ),
    **dict.fromkeys(UNARY_MODULES, pass_colors),
    **dict.fromkeys(UNARY_FUNCTIONS | UNARY_METHODS, pass_colors),
    **dict.fromkeys(BINARY, lambda p, node, value, args, kwargs, metas: p.binary(node, metas, args, value)),
    **dict.fromkeys(
        MATMUL | {F.linear, torch.einsum},
        lambda p, node, value, args, kwargs, metas: p.contraction(node, metas, args, kwargs, value),
    ),
    **dict.fromkeys(
        (torch.cat, torch.concat),
        lambda p, node, value, args, kwargs, metas: p.concat(node, metas, args, kwargs, value),
    ),
    **dict.fromkeys(SHAPE_MODULES, _reshape),
    **dict.fromkeys(SHAPE_FUNCTIONS | SHAPE_METHODS | {operator.getitem}, _reshape),
    **dict.fromkeys(PER_CHANNEL, per_channel),
    **dict.fromkeys(KNOWN_BARRIERS, known_barrier),
}


def register_rule(kind: type | Callable | str, rule: Rule) -> None:
    """Teach `analyze` an operation: `kind` is a module class (its subclasses follow it), a function, or a tensor
    method's name. `rule(color_pass, node, value, args, kwargs, metas)` returns the output's colors: for most
    custom modules one of `pass_colors` (element-wise), `per_channel` (like pooling) or `known_barrier` (mixes
    features). Without a rule an operation is a barrier with a warning."""
    RULES[kind] = rule
