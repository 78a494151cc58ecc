"""The engine's one internal graph: a `torch.fx` graph, traced or built from a layer-chain description."""

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from metta_collapse.errors import CollapseError


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types; the user needs the construct and where it is
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        raise CollapseError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(error).__name__}: {error}. "
            "Describe its layer chain instead (metta_collapse.Step / chain_graph)."
        ) from error


@dataclass
class Step:
    """One operation of a layer chain: a submodule's or a parameter's qualified name, or a function.

    `args` names earlier steps or chain inputs (nested tuples allowed, anything else is a literal);
    empty means the previous step's output."""

    target: str | Callable
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def chain_graph(model: nn.Module, inputs: list[str], steps: list[Step | str], outputs: list[str]) -> fx.GraphModule:
    """Build the graph of a model fx cannot trace from an explicit description of its layer chain."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {name: graph.placeholder(name) for name in inputs}
    previous = nodes[inputs[0]] if inputs else None

    def resolve(arg: Any) -> Any:
        if isinstance(arg, tuple | list):
            return type(arg)(resolve(a) for a in arg)
        return nodes[arg] if isinstance(arg, str) and arg in nodes else arg

    for index, step in enumerate(steps):
        step = Step(step) if isinstance(step, str) else step
        args = resolve(step.args) if step.args else (previous,)
        if isinstance(step.target, str):
            node = _module_or_parameter(graph, model, index, step, args)
        else:
            node = graph.call_function(step.target, args, step.kwargs)
        name = step.name or (step.target if isinstance(step.target, str) else f"step{index}")
        nodes[name] = previous = node
    missing = [name for name in outputs if name not in nodes]
    if missing:
        raise CollapseError(f"layer chain outputs {missing} name no step; steps are {list(nodes)}")
    graph.output(tuple(nodes[name] for name in outputs) if len(outputs) != 1 else nodes[outputs[0]])
    chain = fx.GraphModule(model, graph)
    for node in graph.nodes:
        if node.op == "get_attr":  # fx copies a parameter's owner; share the model's, so rewrites reach the model
            owner, _, _ = node.target.rpartition(".")
            chain.set_submodule(owner, model.get_submodule(owner))
    return chain


def _module_or_parameter(graph: fx.Graph, model: nn.Module, index: int, step: Step, args: tuple) -> fx.Node:
    try:
        model.get_submodule(step.target)
        return graph.call_module(step.target, args, step.kwargs)
    except AttributeError:
        pass
    try:
        model.get_parameter(step.target)
        if "." not in step.target:
            raise CollapseError(f"layer chain step {index}: '{step.target}' must belong to a submodule, not the root")
        return graph.get_attr(step.target)
    except AttributeError:
        raise CollapseError(
            f"layer chain step {index}: {type(model).__name__} has no submodule or parameter '{step.target}'"
        ) from None


def as_graph(model: nn.Module, graph: fx.GraphModule | None) -> fx.GraphModule:
    if graph is not None:
        return graph
    if isinstance(model, fx.GraphModule):
        return model
    return trace(model)
