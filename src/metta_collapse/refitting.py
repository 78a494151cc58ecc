"""`refit`: after a plan is applied, re-solve every rewritten layer so that it reproduces the original network
on recorded inputs (behaviour.md, "The refit").

Layer by layer in graph order, each layer is fed the collapsed network's own upstream activations (so errors
made upstream are compensated) and fitted to the original's pre-activations mapped to the collapsed units (a
merged unit: its fiber's mean; a kept unit: its own; an unchanged output: itself), so the next layer's fit folds
in what the dropped units contributed. Ridge least squares toward the applied weights, bias unpenalised, float64.
A recurrent layer fits its gates jointly over [input | previous hidden | bias], on the collapsed layer's own
hidden states (refreshed between passes); a GRU's n gate, n = tanh(W_in x + b_in + r (W_hn h + b_hn)), fits its
input part and its hidden part apart, since r multiplies only the second."""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from metta_collapse.activations import (
    collapsed_inputs,
    record,
    recurrent_layer_names,
    recurrent_layers,
    recurrent_trajectories,
)
from metta_collapse.graph import as_graph
from metta_collapse.plan import AxisMap, CollapsePlan, ParamMap
from metta_collapse.rewrite import map_collapsed, map_selected

MATMULS = {operator.matmul, torch.matmul, "matmul", torch.einsum, F.linear}
# relative squared residual below which a layer counts as reproduced exactly (float32 rounding is ~1e-14)
EXACT = 1e-10


def ridge(
    x: torch.Tensor, target: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, strength: float, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """argmin |x Wᵀ + b - target|² + λ|W - w0|², λ = `strength` × the mean diagonal of the centred Gram matrix,
    b unpenalised (when `bias`). Returns W, b and the residuals (sum of squares) of (W, b) and (w0, b0)."""
    x, target, w0 = x.double(), target.double(), w0.double()
    before = x @ w0.T + (b0.double() if b0 is not None else 0.0) - target
    if float(before.square().sum()) <= EXACT * float(target.square().sum()):
        # the applied weights already reproduce the layer (an exact merge): fitting float noise only hurts
        residual = float(before.square().sum())
        return w0, None if b0 is None else b0.double(), residual, residual
    if bias:
        x_mean, t_mean = x.mean(0), target.mean(0)
        xc, tc = x - x_mean, target - t_mean
    else:
        xc, tc = x, target
    gram = xc.T @ xc
    lam = strength * float(gram.diagonal().mean()) + 1e-12
    gram.diagonal().add_(lam)
    w = torch.linalg.solve(gram, xc.T @ tc + lam * w0.T).T
    b = t_mean - w @ x_mean if bias else None
    after = x @ w.T + (b if b is not None else 0.0) - target
    return w, b, float(after.square().sum()), float(before.square().sum())


def _out_axes(param: ParamMap | None) -> list[AxisMap]:
    return [axis for axis in param.axes if axis.role == "out"] if param is not None else []


def _to_units(tensor: torch.Tensor, axes: list[AxisMap], axis: int, plan: CollapsePlan) -> torch.Tensor:
    """The original's values on a layer's output axis, mapped to the collapsed units."""
    moved = [AxisMap(axis % tensor.ndim, "out", a.space) for a in axes]
    return map_selected(tensor, moved, plan.kept) if plan.kept is not None else map_collapsed(tensor, moved, "weight")


def _features(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.movedim(axis, -1).reshape(-1, tensor.shape[axis])


def _sites(graph: fx.GraphModule, original: nn.Module, plan: CollapsePlan) -> tuple[list[fx.Node], list[str]]:
    """The nodes whose layer the refit re-solves, in graph order, and the rewritten parameters it leaves merged."""
    sites, covered = [], set()
    for node in graph.graph.nodes:
        names = []
        if node.op == "call_module":
            module = original.get_submodule(node.target)
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and _plain_conv(module)):
                names = [f"{node.target}.{p}" for p in ("weight", "bias") if getattr(module, p) is not None]
            elif isinstance(module, nn.RNNBase) and not module.bidirectional and not module.proj_size:
                names = [f"{node.target}.{p}" for p, _ in module.named_parameters()]
        elif node.target in MATMULS and (weight := _matmul_weight(node)) is not None:
            names = [weight.target]
        if any(name in plan.params for name in names):
            sites.append(node)
            covered.update(names)
    return sites, sorted(name for name, param in plan.params.items() if name not in covered and not param.buffer)


def _plain_conv(module: nn.Conv2d) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def _matmul_weight(node: fx.Node) -> fx.Node | None:
    """x @ W, matmul(x, W), linear(x, W), einsum('..., ...', x, W) with W a 2-d parameter read from the model."""
    operands = node.args[1:] if node.target is torch.einsum else node.args[:2]
    weights = [a for a in operands if isinstance(a, fx.Node) and a.op == "get_attr"]
    return weights[0] if len(operands) == 2 and len(weights) == 1 and operands[1] is weights[0] else None


@torch.no_grad()
def refit(
    model: nn.Module,
    original: nn.Module,
    plan: CollapsePlan,
    inputs: tuple,
    graph: fx.GraphModule | None = None,
    strength: float = 1e-3,
    recurrent_passes: int = 3,
) -> dict:
    """Re-solve, in place, the layers of `model` (collapsed with `plan`) that `plan` rewrote, so that they
    reproduce `original` (the model before the collapse, unchanged) on `inputs`.

    `graph` is the original's graph when fx cannot trace it (as for `analyze`). Linear, Conv2d, recurrent layers and
    2-d weights entering a matmul are refitted; other rewritten parameters keep the applied weights and are
    listed under `kept_merged`. Returns per layer the squared residual on `inputs` of the applied and of the
    refitted weights."""
    graph = as_graph(original, graph)
    inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    sites, kept_merged = _sites(graph, original, plan)
    report = {"layers": [], "kept_merged": kept_merged}
    if not sites:
        return report
    reference = record(graph, original, inputs, {node.name for node in sites})

    def fit(node: fx.Node, args: tuple) -> None:  # just before the collapsed network runs the layer
        if node.op == "call_module" and isinstance(original.get_submodule(node.target), nn.RNNBase):
            report["layers"].extend(
                _refit_recurrent(
                    node.target, model, original, plan, args, reference[node.name][0], strength, recurrent_passes
                )
            )
        else:
            report["layers"].append(_refit_layer(node, model, plan, args, reference[node.name][1], strength))

    # one pass of the collapsed network: each layer is refitted on the inputs its refitted upstream gives it
    record(graph, model, collapsed_inputs(graph, plan, inputs), {node.name for node in sites}, before=fit)
    return report


def _refit_layer(
    node: fx.Node, model: nn.Module, plan: CollapsePlan, args: tuple, target: torch.Tensor, strength: float
) -> dict:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        name, weight, bias = node.target, module.weight, module.bias
        out_axis = 1 if isinstance(module, nn.Conv2d) else -1
        target = _to_units(target, _out_axes(plan.params.get(f"{name}.weight")), out_axis, plan)
        if isinstance(module, nn.Conv2d):
            x = F.unfold(args[0], module.kernel_size, module.dilation, module.padding, module.stride)
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
            w0 = weight.reshape(weight.shape[0], -1)
        else:
            x, w0 = _features(args[0], -1), weight
        solved_w, solved_b, after, before = ridge(
            x, _features(target, out_axis), w0, bias, strength, bias=bias is not None
        )
        with torch.no_grad():
            weight.copy_(solved_w.reshape(weight.shape))
            if bias is not None:
                bias.copy_(solved_b)
        return {"name": name, "residual_applied": before, "residual_refit": after}
    weight_node = _matmul_weight(node)
    name = weight_node.target
    param = plan.params.get(name)
    module_name, _, attribute = name.rpartition(".")
    weight = getattr(model.get_submodule(module_name), attribute)
    # W (in, out) as in x @ W, or (out, in) as in linear(x, W); einsum: whichever axis the plan calls "out"
    out_axis = 0 if node.target is F.linear else 1
    if node.target is torch.einsum and param is not None:
        out_axis = next(
            (a.axis for a in param.axes if a.role == "out"), 1 - next(a.axis for a in param.axes if a.role == "in")
        )
    x = args[1] if node.target is torch.einsum else args[0]
    target = _to_units(target, _out_axes(param), -1, plan)
    w0 = weight if out_axis == 0 else weight.T
    solved, _, after, before = ridge(_features(x, -1), _features(target, -1), w0, None, strength, bias=False)
    with torch.no_grad():
        weight.copy_(solved if out_axis == 0 else solved.T)
    return {"name": name, "residual_applied": before, "residual_refit": after}


def _refit_recurrent(
    target: str,
    model: nn.Module,
    original: nn.Module,
    plan: CollapsePlan,
    args: tuple,
    reference_args: tuple,
    strength: float,
    passes: int,
) -> list[dict]:
    module, source = model.get_submodule(target), original.get_submodule(target)
    names = recurrent_layer_names(source, target)
    sequences = recurrent_trajectories(source, reference_args)
    reports = []
    for index, (layer, (x_ref, previous_ref, _)) in enumerate(zip(recurrent_layers(source), sequences, strict=True)):
        axes = _out_axes(plan.params.get(names[index]["weight_ih"]))
        targets = {  # each weight's part of the original's gate pre-activations, with its bias
            "weight_ih": x_ref @ layer["weight_ih"].T + layer.get("bias_ih", 0.0),
            "weight_hh": previous_ref @ layer["weight_hh"].T + layer.get("bias_hh", 0.0),
        }
        targets = {name: _features(_to_units(value, axes, -1, plan), -1) for name, value in targets.items()}
        live = recurrent_layers(module)[index]
        has_bias = "bias_ih" in live
        applied = {name: tensor.detach().clone() for name, tensor in live.items()}
        width = live["weight_hh"].shape[1]
        # (gate rows, weights fitted jointly with their summed biases)
        blocks = [(slice(None), ("weight_ih", "weight_hh"))]
        if module.mode == "GRU":
            blocks = [
                (slice(0, 2 * width), ("weight_ih", "weight_hh")),
                (slice(2 * width, None), ("weight_ih",)),
                (slice(2 * width, None), ("weight_hh",)),
            ]
        for _ in range(passes):
            x, previous, _ = recurrent_trajectories(module, args)[index]
            designs = {"weight_ih": _features(x, -1), "weight_hh": _features(previous, -1)}
            after = before = 0.0
            for rows, weights in blocks:
                biases = [name.replace("weight", "bias") for name in weights]
                solved, bias, block_after, block_before = ridge(
                    torch.cat([designs[w] for w in weights], dim=1),
                    sum(targets[w][:, rows] for w in weights),
                    torch.cat([applied[w][rows] for w in weights], dim=1),
                    sum(applied[b][rows] for b in biases) if has_bias else None,
                    strength,
                    bias=has_bias,
                )
                after, before = after + block_after, before + block_before
                with torch.no_grad():
                    offset = 0
                    for w in weights:
                        live[w][rows] = solved[:, offset : offset + live[w].shape[1]]
                        offset += live[w].shape[1]
                    if has_bias:  # the fitted bias goes to the first bias, the others keep their values
                        live[biases[0]][rows] = bias - sum(live[b][rows] for b in biases[1:])
        name = target if len(names) == 1 else f"{target}.l{index}"
        reports.append({"name": name, "residual_applied": before, "residual_refit": after})
    return reports
