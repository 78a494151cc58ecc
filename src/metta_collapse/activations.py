"""Run a model's graph on recorded inputs and keep what some nodes saw and produced: the data the basis and
the refit work from. The graph may be the one of the original model while the modules and parameters are
taken from another, collapsed one (same names), so one graph serves both."""

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from metta_collapse.plan import CollapsePlan
from metta_collapse.rewrite import RecurrentStack, map_state


class _Stop(Exception):
    pass


class Recorder(fx.Interpreter):
    """Runs `graph` with the modules and tensors of `model`; keeps the inputs and the output of `nodes` and
    stops once it has them all. `before(node, args)`, if given, runs before each of `nodes` executes (and may
    change the weights it is about to use)."""

    def __init__(self, graph: fx.GraphModule, model: nn.Module, nodes: set[str], before: Callable | None = None):
        super().__init__(graph)
        self.extra_traceback = False  # the early stop is an exception; annotating it costs a second
        self.model, self.nodes, self.before = model, nodes, before
        self.seen: dict[str, tuple[tuple, Any]] = {}

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        return self.model.get_submodule(target)(*args, **kwargs)

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        module_name, _, attribute = target.rpartition(".")
        return getattr(self.model.get_submodule(module_name), attribute)

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.nodes and self.before is not None:
            self.before(node, fx.node.map_arg(node.args, lambda n: self.env[n]))
        value = super().run_node(node)
        if node.name in self.nodes:
            args = fx.node.map_arg(node.args, lambda n: self.env[n])
            self.seen[node.name] = (args, value)
            if len(self.seen) == len(self.nodes):
                raise _Stop
        return value


def record(
    graph: fx.GraphModule, model: nn.Module, inputs: tuple, nodes: set[str], before: Callable | None = None
) -> dict[str, tuple[tuple, Any]]:
    """{node name: (its arguments, its output)} for `nodes`, running `graph` with `model`'s weights."""
    recorder = Recorder(graph, model, set(nodes), before)
    if nodes:
        with torch.no_grad():
            try:
                recorder.run(*inputs)
            except _Stop:
                pass
    return recorder.seen


def collapsed_inputs(graph: fx.GraphModule, plan: CollapsePlan, inputs: tuple) -> tuple:
    """The inputs mapped to a collapsed model: recurrent states at the collapsed widths."""
    placeholders = [node.target for node in graph.graph.nodes if node.op == "placeholder"]
    return tuple(
        map_state(plan, name, value, plan.kept) if name in plan.states else value
        for name, value in zip(placeholders, inputs, strict=False)
    )


# ----- recurrent layers (LSTM, GRU, RNN) one at a time

_RUN = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


def recurrent_layers(module: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per layer: its weight_ih, weight_hh, bias_ih, bias_hh (an LSTM, GRU or RNN of any depth, or a
    RecurrentStack)."""
    if isinstance(module, RecurrentStack):
        return [recurrent_layers(layer)[0] for layer in module.layers]
    return [
        {
            name: getattr(module, f"{name}_l{index}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            if hasattr(module, f"{name}_l{index}")
        }
        for index in range(module.num_layers)
    ]


def recurrent_layer_names(module: nn.Module, prefix: str) -> list[dict[str, str]]:
    """The qualified parameter names of `recurrent_layers(module)`."""
    if isinstance(module, RecurrentStack):
        return [
            {name: f"{prefix}.layers.{i}.{name}_l0" for name in recurrent_layers(layer)[0]}
            for i, layer in enumerate(module.layers)
        ]
    return [{name: f"{prefix}.{name}_l{i}" for name in layer} for i, layer in enumerate(recurrent_layers(module))]


def recurrent_call(module: nn.Module, args: tuple) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """A recurrent call's input as (batch, time, features) and each layer's initial state: (h, c) for an LSTM,
    (h,) otherwise, each (batch, hidden)."""
    x = args[0]
    batch_first = module.batch_first
    if x.ndim == 2:
        x = x.unsqueeze(0 if batch_first else 1)
    x = x if batch_first else x.transpose(0, 1)
    widths = [layer["weight_hh"].shape[1] for layer in recurrent_layers(module)]
    tensors = 2 if module.mode == "LSTM" else 1
    state = args[1] if len(args) > 1 else None
    if state is None:
        return x, [(x.new_zeros(x.shape[0], width),) * tensors for width in widths]
    state = state if isinstance(state, tuple | list) else (state,)
    state = [s.reshape(-1, s.shape[-2], s.shape[-1]) for s in state]  # (layers or 1, batch, hidden)
    if isinstance(module, RecurrentStack):
        per_tensor = [s[0].split(widths, dim=-1) for s in state]
    else:
        per_tensor = [s.unbind(0) for s in state]
    return x, list(zip(*per_tensor, strict=True))


def run_recurrent_layer(mode: str, layer: dict[str, torch.Tensor], x: torch.Tensor, state: tuple) -> torch.Tensor:
    """One layer over (batch, time, features) from its initial state: its hidden states (batch, time, hidden)."""
    weights = [layer["weight_ih"], layer["weight_hh"]]
    biases = [layer[name] for name in ("bias_ih", "bias_hh") if name in layer]
    hx = tuple(s.unsqueeze(0).contiguous() for s in state)
    output = _RUN[mode](x, hx if mode == "LSTM" else hx[0], weights + biases, bool(biases), 1, 0.0, False, False, True)
    return output[0]


def recurrent_trajectories(module: nn.Module, args: tuple) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: its input sequence, its hidden states before each step and after each step, all
    (batch, time, ·), for a recurrent call with arguments `args`."""
    x, states = recurrent_call(module, args)
    out = []
    with torch.no_grad():
        for layer, state in zip(recurrent_layers(module), states, strict=True):
            hidden = run_recurrent_layer(module.mode, layer, x, state)
            previous = torch.cat([state[0].unsqueeze(1), hidden[:, :-1]], dim=1)
            out.append((x, previous, hidden))
            x = hidden
    return out
