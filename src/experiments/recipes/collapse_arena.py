"""Train the arena, collapse the policy by fibration symmetry at `collapse.epoch_idx`, keep training.

    ./tools/run.py experiments.recipes.collapse_arena.train run=c1 collapse.epoch_idx=300 collapse.budget.params=0.25
    ./tools/run.py experiments.recipes.collapse_arena.train collapse.init_from=base collapse.epoch_idx=300
    ./tools/run.py experiments.recipes.collapse_arena.sweep trials=8 trial.trainer.total_timesteps=2000000

Built on the baseline recipe `arena_basic_easy_shaped`: the same tool, plus the `collapse` section. One recipe,
two runtimes: inside a Metta checkout (`RUNTIME` is Metta's era) it builds on Metta's own recipe and train tool,
with the same `collapse.*` override paths; elsewhere on the embedded runtime (`RUNTIME == "embedded"`).
"""

from metta_collapse.integrations import detect_era

RUNTIME = detect_era() or "embedded"

if RUNTIME == "embedded":
    from experiments.recipes import arena_basic_easy_shaped
    from metta_collapse.training.collapse import CollapseTrainTool
    from metta_collapse.training.config import TrainTool
    from metta_collapse.training.sweep import SweepTool

    def _with_collapse(base: TrainTool) -> CollapseTrainTool:
        # attribute objects, not model_dump(): typed sub-configs stay typed
        return CollapseTrainTool(**{name: getattr(base, name) for name in type(base).model_fields})

    def train(run: str | None = None) -> CollapseTrainTool:
        return _with_collapse(arena_basic_easy_shaped.train(run))

    def small(run: str | None = None) -> CollapseTrainTool:
        """The small arena (the README's demo): trains, collapses at epoch 40, keeps training to epoch 80."""
        tool = _with_collapse(arena_basic_easy_shaped.small(run))
        tool.collapse.epoch_idx = 40
        return tool

    def sweep(name: str = "collapse_sweep") -> SweepTool:
        return SweepTool(name=name, trial=train())

else:
    from metta_collapse.integrations.metta import metta_sweep, metta_train

    def train():  # noqa: ANN201 - Metta's TrainTool subclass, built on first use; `run=` goes to its invoke
        return metta_train()

    def evaluate_in_sweep(policy_uri: str):  # noqa: ANN201
        """What current Metta's sweep calls to score a trial; September has neither that sweep nor `recipes.prod`."""
        if RUNTIME != "current":
            raise NotImplementedError(
                f"collapse_arena.evaluate_in_sweep is current Metta's sweep evaluation; this is {RUNTIME} Metta, "
                "whose sweep this recipe does not drive: evaluate with September's own sim tool, or sweep on the "
                "embedded runtime"
            )
        from recipes.prod import arena_basic_easy_shaped

        return arena_basic_easy_shaped.evaluate_in_sweep(policy_uri)

    def sweep(sweep_name: str, size: str = "params"):  # noqa: ANN201
        """Metta's Protein sweep (current era) over `collapse.budget.<size>` (params or macs) and the fraction of
        the run at which the collapse comes."""
        return metta_sweep(sweep_name, recipe=__name__, size=size)
