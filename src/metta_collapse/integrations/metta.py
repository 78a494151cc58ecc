"""Metta's entry points for the recipe (docs/metta.md), in both of Metta's eras: which era is installed, the
`collapse` section declared on Metta's Config base, the train tool with it, the refusals before training, and
the sweep.

Metta is imported lazily: without it this module still imports. The rest of the adapter: `fast` (the layer
chains of Metta's `fast` policies), `hook` (the collapse of a live agent, shared by both eras), `current` and
`september` (the wiring into each era's trainer), `cortex_core` (a Cortex core narrower than its input).
"""

import functools
import math
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, create_model
from torch import nn

import metta_collapse as mc
from metta_collapse.integrations import detect_era
from metta_collapse.integrations.current import component_class, narrow_architecture
from metta_collapse.integrations.hook import CollapseHook
from metta_collapse.integrations.september import loss_class

# ----- the `collapse` section, declared on Metta's Config base


def section_fields(knobs: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The section's fields; the embedded runtime's `CollapseSection` has the same names, types and defaults.
    `knobs` holds the thresholds, rank_tol and budget classes. Branching (`init_from`) and the scratch null
    model need a restart from a checkpoint: embedded only."""
    return {
        "enabled": (bool, True),
        "epoch_idx": (int, Field(default=10, ge=0)),
        # sweep-only: epoch_idx = ⌊epoch_fraction × the run's epochs⌋, so that every trial collapses
        "epoch_fraction": (float | None, Field(default=None, gt=0.0, lt=1.0)),
        "metric": (mc.config.Metric, "basis"),
        **{name: (cls, Field(default_factory=cls)) for name, cls in knobs.items()},
        "refit": (bool, True),
        "fit_steps": (int, Field(default=6144, ge=1)),
        "mode": (Literal["fibration", "random_ablation"], "fibration"),
        "optimizer_state": (Literal["remap", "reset"], "remap"),
        # current era: shrink the Cortex core too (the policy then needs this project to load), or keep Metta's classes
        "core": (Literal["shrink", "stock"], "shrink"),
        "seed": (int, 0),
    }


def section_class(base: type[BaseModel]) -> type[BaseModel]:
    """`CollapseSection` on `base`: Metta's override walker only enters Metta `Config` objects."""
    knobs = {
        name: create_model(
            f"Collapse{engine.__name__}",
            __base__=base,
            **{field: (f.annotation, f) for field, f in engine.model_fields.items()},
        )
        for name, engine in (("thresholds", mc.Thresholds), ("rank_tol", mc.RankTol), ("budget", mc.Budget))
    }
    return create_model("CollapseSection", __base__=base, **section_fields(knobs))


@functools.cache
def metta_section_class() -> type[BaseModel]:
    if detect_era() == "current":
        from mettagrid.base_config import Config
    else:
        from metta.mettagrid.config import Config
    return section_class(Config)


def refuse_unsupported(tool: Any) -> None:
    """Before training: settings under which an in-place change of parameter shapes would break Metta's run."""
    if not tool.collapse.enabled:
        return
    try:  # Metta's override check validates the leaf's type only, not the section's bounds
        type(tool.collapse).model_validate(tool.collapse.model_dump())
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise ValueError(f"collapse.{field}={problem.get('input')!r}: {problem['msg']}") from None
    mc.config.check_section(tool.collapse)
    if tool.collapse.core == "stock" and detect_era() == "september":
        raise ValueError("collapse.core=stock keeps current Metta's Cortex core; September's LSTM always collapses")
    if getattr(tool.trainer, "compile", False):
        raise ValueError("trainer.compile=true is not supported with collapse.enabled: shapes change mid-training")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and detect_era() == "september":
        raise ValueError(
            f"collapse.enabled with {world} processes (WORLD_SIZE): in September Metta the collapse runs in one "
            "process only: train past epoch_idx in one process, then resume distributed with collapse.enabled=false "
            "(the checkpoint carries the collapsed widths)"
        )


def prepare(tool: Any) -> None:
    """Before Metta trains: refuse what breaks an in-place collapse, place a sweep trial's collapse, limit threads."""
    refuse_unsupported(tool)
    apply_epoch_fraction(tool)
    limit_threads()


def limit_threads() -> None:
    """One torch / OpenMP thread unless OMP_NUM_THREADS says otherwise: with more, Metta's trainer beside another
    job oversubscribes the cores (measured: 283 agent steps/s instead of 5,260)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def apply_epoch_fraction(tool: Any) -> None:
    """A sweep trial's `collapse.epoch_fraction` becomes its `collapse.epoch_idx`, inside its agent steps."""
    section = tool.collapse
    if section.enabled and section.epoch_fraction is not None:
        epochs = math.ceil(tool.trainer.total_timesteps / tool.trainer.batch_size)
        section.epoch_idx = mc.config.epoch_at_fraction(section.epoch_fraction, epochs)


@functools.cache
def metta_train_tool_class() -> type:
    """Metta's `TrainTool` plus the `collapse` section, for the era found."""
    from metta.tools.train import TrainTool

    section_type = metta_section_class()  # not `section`: a class body's annotation would shadow it
    if detect_era() == "current":
        from metta.rl.training.component import TrainerComponent

        component = component_class(TrainerComponent)

        class CollapseTrainTool(TrainTool):
            collapse: section_type = Field(default_factory=section_type)

            def invoke(self, *args: Any) -> int | None:
                prepare(self)
                if self.collapse.enabled and self.collapse.core == "shrink":
                    self.policy_architecture = narrow_architecture(self.policy_architecture)
                return super().invoke(*args)

            def _register_components(self, *, trainer: Any, wandb_run: Any = None, **kwargs: Any) -> None:
                super()._register_components(trainer=trainer, wandb_run=wandb_run, **kwargs)
                hook = CollapseHook(self.collapse, "current", wandb_run)
                trainer.register(component(hook, self.policy_architecture))

        return CollapseTrainTool

    from metta.mettagrid.config import Config
    from metta.rl.loss.base_loss import BaseLoss

    loss = loss_class(BaseLoss)

    class CollapseLossConfig(Config):
        section: section_type

        def init_loss(self, policy: nn.Module, trainer_cfg: Any, vec_env: Any, device: Any, *args: Any):
            return loss(policy, trainer_cfg, vec_env, device, *args)

    class CollapseTrainTool(TrainTool):
        collapse: section_type = Field(default_factory=section_type)

        def invoke(self, *args: Any) -> int | None:
            prepare(self)
            self.trainer.losses.loss_configs["collapse"] = CollapseLossConfig(section=self.collapse)
            return super().invoke(*args)

    return CollapseTrainTool


def metta_train() -> Any:
    """Metta's `arena_basic_easy_shaped` train tool with the `fast` policy, plus the `collapse` section. The run
    name comes as Metta's `run=` argument, which Metta's train tool takes itself."""
    if detect_era() == "current":
        from metta.agent.policies.fast import FastConfig
        from recipes.prod import arena_basic_easy_shaped

        architecture = FastConfig()
        # a8d1ece's FastPolicy leaves the Cortex replay keys (row_id, t_in_row) out of its experience spec, so
        # training with stored core states fails at the first minibatch (KeyError in cortex.py); start each
        # training segment from zero state instead, as PufferLib does
        core = architecture.cortex_core_config.model_copy(update={"pass_state_during_training": False})
        architecture.cortex_core_config = core
        base = arena_basic_easy_shaped.train(policy_architecture=architecture)
    else:
        from metta.agent.agent_config import AgentConfig

        from experiments.recipes import arena_basic_easy_shaped

        base = arena_basic_easy_shaped.train()
        # the study's component `fast` (Metta's default); `policy_architecture.name=pytorch/fast` works too
        base.policy_architecture = base.policy_architecture or AgentConfig()
    # attribute objects, not model_dump(): typed sub-configs stay typed
    return metta_train_tool_class()(**{name: getattr(base, name) for name in type(base).model_fields})


def metta_sweep(sweep_name: str, recipe: str, size: mc.config.Size = "params") -> Any:
    """Current era: Metta's Protein sweep over the collapse's size budget (`size`: of the parameters or the
    multiply-adds) and the fraction of the run at which it comes (override paths of the train tool, so a trial is
    `./tools/run.py ... path=value`)."""
    if detect_era() != "current":
        raise NotImplementedError("the Metta sweep is built for the current era only; September: use the embedded one")
    from metta.sweep.core import Distribution as D
    from metta.sweep.core import SweepParameters as SP
    from metta.sweep.core import make_sweep

    parameters = [
        SP.param(path, D.LOGIT_NORMAL, min=low, max=high, search_center=center)
        for path, (low, high, center) in mc.config.sweep_space(size).items()
    ]
    return make_sweep(
        name=sweep_name,
        recipe=recipe,
        train_entrypoint="train",
        eval_entrypoint="evaluate_in_sweep",
        metric_key="evaluator/eval_sweep/score",
        search_space=parameters,
    )
