"""Current Metta (a8d1ece): the collapse as a trainer component, and the train tool's architecture kept at the
live policy's widths (Metta's checkpoints rebuild the policy from it). Metta's base class is a parameter, so
tests can stand in for it."""

from typing import Any

from pydantic import BaseModel
from torch import nn

import metta_collapse as mc
from metta_collapse.integrations.fast import CORTEX_LSTM, find_fast
from metta_collapse.integrations.hook import MARKER, CollapseHook, log


def sync_architecture(architecture: BaseModel, root: nn.Module) -> bool:
    """Write the live `FastPolicy`'s widths into its `FastConfig`: Metta's checkpoints store that config
    (`to_spec`) and rebuild the policy from it before loading the weights strictly. True if a width changed."""
    encoder = architecture.cnn_encoder_config
    sizes = {"cnn1": "out_channels", "cnn2": "out_channels", "fc1": "out_features", "encoded_obs": "out_features"}
    layers = {
        f"{name}_cfg": {**getattr(encoder, f"{name}_cfg"), size: getattr(root.cnn_encoder.get_submodule(name), size)}
        for name, size in sizes.items()
    }
    heads = {
        "actor_hidden_dim": root.get_submodule("actor_1.module").out_features,
        "critic_hidden_dim": root.get_submodule("critic_1.module").out_features,
    }
    before = architecture.model_dump()
    architecture.cnn_encoder_config = encoder.model_copy(update=layers)
    for name, width in heads.items():
        setattr(architecture, name, width)
    if getattr(architecture, "class_path", "").endswith(".NarrowFastPolicy"):
        from metta_collapse.integrations.cortex_core import narrow_core_config

        core, lstm = architecture.cortex_core_config, root.get_submodule(CORTEX_LSTM)
        if (lstm.input_size, lstm.hidden_size) != (core.d_hidden, core.out_features or core.d_hidden):
            architecture.cortex_core_config = narrow_core_config(core, lstm.input_size, lstm.hidden_size)
    return architecture.model_dump() != before


def component_class(base: type) -> type:
    """Current era: a `TrainerComponent` collapsing at `on_epoch_end(epoch)` once epoch >= epoch_idx, and
    keeping `architecture` (the train tool's `policy_architecture`, which Metta's checkpointer serialises) at
    the live policy's widths — after a collapse, and on a resumed run whose checkpoint was collapsed."""

    class CollapseComponent(base):
        def __init__(self, hook: CollapseHook, architecture: BaseModel | None = None):
            super().__init__(epoch_interval=1)
            self.hook = hook
            self.architecture = architecture

        def register(self, context: Any) -> None:
            super().register(context)
            try:
                loaded_collapsed = self.sync()
            except mc.CollapseError:
                if self.hook.section.enabled:
                    raise
                return  # not a `fast` policy, and no collapse asked for
            if loaded_collapsed and self.hook.pending(context.policy):
                setattr(context.policy, MARKER, {"loaded_collapsed": True})
                log.warning("the policy was loaded narrower than the recipe's architecture: no second collapse")
            env_info = getattr(getattr(context, "env", None), "policy_env_info", None)
            self.hook.agents_per_env = getattr(env_info, "num_agents", 1)
            self.hook.watch(context.policy, context.epoch)

        def on_epoch_end(self, epoch: int) -> None:
            context = self.context
            collapsed = self.hook.maybe_collapse(
                context.policy, context.optimizer, epoch, context.agent_step, getattr(context, "distributed", None)
            )
            if collapsed is not None:
                self.sync()
            self.hook.watch(context.policy, epoch)

        def sync(self) -> bool:
            if self.architecture is None:
                return False
            prefix, _ = find_fast(self.context.policy, "current", self.hook.section.core)
            return sync_architecture(self.architecture, self.context.policy.get_submodule(prefix))

    return CollapseComponent


def narrow_architecture(architecture: BaseModel) -> BaseModel:
    """Metta's `FastConfig` as `NarrowFastConfig` (the same fields), whose policy can be built with a core
    narrower than its input; any other architecture as it is."""
    from metta.agent.policies.fast import FastConfig

    if type(architecture) is not FastConfig:
        return architecture
    from metta_collapse.integrations.cortex_core import NarrowFastConfig

    fields = {name: getattr(architecture, name) for name in type(architecture).model_fields if name != "class_path"}
    return NarrowFastConfig(**fields)
