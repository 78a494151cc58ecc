"""Current Metta (a8d1ece): a `fast` policy whose Cortex core may be narrower than its input, so that a collapse
can shrink the core's LSTM and Metta's checkpoints (`policy_spec.json`) still rebuild the policy.

Metta's classes tie the core's width to its input: Cortex's `LSTMCell` takes its input at its hidden size,
`PassThroughBlock` asserts the cell's width is the stack's `d_hidden`, and `FastPolicy` builds its heads at the
core's configured width. The subclasses below override only that; they register with Cortex's registries under
their own tags, and `to_spec` names `NarrowFastConfig` by its import path, so loading such a checkpoint needs this
module importable. Importing it needs Metta."""

from cortex.blocks.base import BaseBlock
from cortex.blocks.passthrough import PassThroughBlock
from cortex.blocks.registry import register_block
from cortex.cells.lstm import LSTMCell
from cortex.cells.registry import register_cell
from cortex.config import LSTMCellConfig, PassThroughBlockConfig
from metta.agent.policies.fast import FastConfig, FastPolicy
from torch import nn


class NarrowLSTMCellConfig(LSTMCellConfig):
    cell_type: str = "lstm_narrow"
    input_size: int  # the stack's d_hidden; hidden_size may be smaller


@register_cell(NarrowLSTMCellConfig)
class NarrowLSTMCell(LSTMCell):
    def __init__(self, cfg: NarrowLSTMCellConfig) -> None:
        super().__init__(cfg)
        width = self.net.weight_ih_l0
        self.net.weight_ih_l0 = nn.Parameter(width.new_empty(width.shape[0], cfg.input_size))
        nn.init.orthogonal_(self.net.weight_ih_l0, 1.0)  # LSTMCell's own initialisation
        self.net.input_size = cfg.input_size
        self.net._init_flat_weights()


class NarrowPassThroughBlockConfig(PassThroughBlockConfig):
    block_type: str = "passthrough_narrow"
    hidden_size: int  # the cell's width, below the stack's d_hidden

    def get_cell_hidden_size(self, d_hidden: int) -> int:
        return self.hidden_size


@register_block(NarrowPassThroughBlockConfig)
class NarrowPassThroughBlock(PassThroughBlock):
    def __init__(self, config: NarrowPassThroughBlockConfig, d_hidden: int, cell: LSTMCell) -> None:
        BaseBlock.__init__(self, d_hidden=d_hidden, cell=cell)  # without PassThroughBlock's width assertion
        self.config = config


class NarrowFastConfig(FastConfig):
    class_path: str = "metta_collapse.integrations.cortex_core.NarrowFastPolicy"


class NarrowFastPolicy(FastPolicy):
    """`FastPolicy` with its heads at the core's own output width."""

    def __init__(self, policy_env_info: object, config: NarrowFastConfig | None = None) -> None:
        super().__init__(policy_env_info, config or NarrowFastConfig())
        width = core_lstm(self).hidden_size
        for head in (self.actor_1, self.critic_1):
            if head.module.in_features != width:
                old = head.module
                head.module = nn.Linear(width, old.out_features, device=old.weight.device, dtype=old.weight.dtype)


def core_lstm(policy: FastPolicy) -> nn.LSTM:
    """The `nn.LSTM` inside a `fast` policy's Cortex core (one column of one pass-through LSTM expert)."""
    lstms = [module for module in policy.core.modules() if isinstance(module, nn.LSTM)]
    if len(lstms) != 1:
        raise ValueError(f"the Cortex core holds {len(lstms)} LSTMs; a narrow core is built for exactly one")
    return lstms[0]


def narrow_core_config(core_cfg: object, input_width: int, width: int) -> object:
    """The policy's `CortexTDConfig` with its LSTM expert taking `input_width` features (the encoder's) to
    `width` hidden units, and no output projection: the heads take the LSTM's output."""
    stack_cfg = core_cfg.stack_cfg
    (column,) = stack_cfg.blocks
    (expert,) = column.experts
    cell = NarrowLSTMCellConfig(
        **(expert.cell.model_dump() | {"cell_type": "lstm_narrow", "hidden_size": width}), input_size=input_width
    )
    narrow = NarrowPassThroughBlockConfig(cell=cell, hidden_size=width)
    column = column.model_copy(update={"experts": [narrow]})
    stack_cfg = stack_cfg.model_copy(update={"blocks": [column], "d_hidden": input_width})
    return core_cfg.model_copy(update={"stack_cfg": stack_cfg, "d_hidden": input_width, "out_features": None})
