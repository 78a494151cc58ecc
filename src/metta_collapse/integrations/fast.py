"""Metta's `fast` policies as the engine sees them: a layer chain per policy (`mc.chain_graph`), the layers
whose inputs the trainer's rollout passes are read at, and what each policy keeps beside its parameters."""

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

import metta_collapse as mc
from metta_collapse.integrations import Era
from metta_collapse.rewrite import map_collapsed, map_selected

S = mc.Step


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
