"""September 2025 Metta (b712df1, the study's fork): the collapse as a loss. Metta's base class is a parameter,
so tests can stand in for it."""

from typing import Any

from torch import nn

from metta_collapse.integrations.hook import CollapseFailed, CollapseHook, metrics


def loss_class(base: type) -> type:
    """September era: a `BaseLoss` collapsing in `on_new_training_run` once `trainer_state.epoch >= epoch_idx`
    (the epoch advances by update_epochs); its rollouts are watched during the rollout phase only, so the hooks
    are never pickled with a checkpointed agent. A failed collapse is logged and counted (`losses/collapse_failed`)."""

    class CollapseLoss(base):
        def __init__(self, policy: nn.Module, trainer_cfg: Any, vec_env: Any, device: Any, *args: Any):
            super().__init__(policy, trainer_cfg, vec_env, device, *args)
            agents_per_env = getattr(getattr(vec_env, "driver_env", None), "num_agents", 1)
            self.hook = CollapseHook(self.loss_cfg.section, "september", agents_per_env=agents_per_env)

        def on_new_training_run(self, trainer_state: Any) -> None:
            super().on_new_training_run(trainer_state)
            try:
                record = self.hook.maybe_collapse(
                    self.policy, trainer_state.optimizer, trainer_state.epoch, trainer_state.agent_step
                )
            except CollapseFailed:  # logged; September's trainer would die of it, so training goes on uncollapsed
                self.loss_tracker["collapse_failed"].append(1.0)
                return
            if record is not None:
                for key, value in metrics(record).items():
                    self.loss_tracker[key.replace("/", "_")].append(value)

        def on_rollout_start(self, trainer_state: Any) -> None:
            super().on_rollout_start(trainer_state)
            self.hook.watch(self.policy, trainer_state.epoch)

        def on_train_phase_end(self, trainer_state: Any) -> None:
            super().on_train_phase_end(trainer_state)
            self.hook.unwatch()

    return CollapseLoss
