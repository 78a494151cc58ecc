"""Configuration of the engine: the collapse thresholds and metric, and what a model's inputs/outputs are."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Metric = Literal["cosine", "exact", "scale_aware", "basis"]
WEIGHT_METRICS = ("cosine", "exact", "scale_aware")
# the fewest real samples a basis of the activations is chosen from (never the weight metrics' empty example)
MIN_SAMPLES = 1000
InputRole = Literal["features", "state", "index"]
OutputRole = Literal["logits", "value", "state", "features"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Thresholds(_Strict):
    """Distance cut per kind of layer: 0 = exact fibration only, 2 = merge every unit of a layer."""

    linear: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    cnn: float = Field(0.5, ge=0.0, le=2.0, allow_inf_nan=False)
    lstm: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    critic: float = Field(0.8, ge=0.0, le=2.0, allow_inf_nan=False)


class RankTol(_Strict):
    """Per kind of layer, the relative residual a basis of the recorded activations may leave: the fewest units
    whose span holds all of the layer's centred activations but this fraction (Frobenius norm)."""

    linear: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)
    cnn: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)
    lstm: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)
    critic: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)

    def scaled(self, scale: float) -> dict[str, float]:
        return {kind: min(1.0, value * scale) for kind, value in self.model_dump().items()}


class Budget(_Strict):
    """Size the collapse by what it may cost instead of by the chosen units' own knob (at most one of these):
    `params`, the kept fraction of the parameters (at most this); `macs`, the kept fraction of the policy's
    multiply-adds per agent step (at most this); `kl`, the mean KL divergence of the action distribution after
    the refit on the select part of the data (at most this)."""

    params: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    macs: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    kl: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        given = [f"budget.{name}" for name in ("params", "macs", "kl") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of budget.params, budget.macs and budget.kl, not {' and '.join(given)}")
        return self

    @property
    def size(self) -> tuple[str, float] | None:
        """The fraction of the model a size budget keeps: ("params" or "macs", fraction); None without one."""
        return next(
            ((name, getattr(self, name)) for name in ("params", "macs") if getattr(self, name) is not None), None
        )


class CollapseConfig(_Strict):
    """`cosine`: the study's average linkage on cosine distance (default, keeps the study's thresholds' meaning).
    `exact`: exact fibration (rows equal within `tolerance`, relative). `scale_aware`: average linkage on
    2|vi - vj| / (|vi| + |vj|), which unlike cosine bounds the change of each unit's pre-activation, so
    (w, b) and (2w, 2b) stay apart. Under `cosine` and `scale_aware` a threshold of 0 means exact. `basis`:
    units chosen from recorded activations (`select_basis`), their number set by `rank_tol`."""

    thresholds: Thresholds = Field(default_factory=Thresholds)
    metric: Metric = "cosine"
    rank_tol: RankTol = Field(default_factory=RankTol)
    tolerance: float = Field(1e-4, gt=0.0, lt=1.0, allow_inf_nan=False)
    strict: bool = False


class InputSpec(_Strict):
    role: InputRole = "features"
    axis: int = 1


class ModelSpec(_Strict):
    """Roles of a model's inputs (by forward argument name) and outputs (in flattened output order).

    Logits, value and plain feature outputs keep their size; recurrent-state inputs and outputs follow the
    partition of the LSTM they belong to. Inputs not named are features on axis 1."""

    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    outputs: list[OutputRole] = Field(default_factory=list)

    def input(self, name: str) -> InputSpec:
        return self.inputs.get(name, InputSpec())

    def output(self, index: int) -> OutputRole:
        return self.outputs[index] if index < len(self.outputs) else "features"


def check_section(section: Any) -> None:
    """The `collapse` section of either runtime's recipe (the same fields): exactly one thing sets the size,
    the chosen units' own knob or a budget. Raises ValueError naming the override paths."""
    given = [f"collapse.{name}.*" for name in ("thresholds", "rank_tol") if getattr(section, name).model_fields_set]
    budget = section.budget
    given += [f"collapse.budget.{name}" for name in ("params", "macs", "kl") if getattr(budget, name) is not None]
    own = "rank_tol" if section.metric == "basis" else "thresholds"
    foreign = [g for g in given if g.startswith("collapse.t" if own == "rank_tol" else "collapse.r")]
    if foreign:
        raise ValueError(
            f"{foreign[0]} is not a knob of collapse.metric={section.metric}: its size is set by "
            f"collapse.{own}.* or collapse.budget.params / collapse.budget.macs / collapse.budget.kl"
        )
    if len(given) > 1:
        raise ValueError(f"the collapse's size is set twice ({' and '.join(given)}): give one of them")
    if section.metric == "exact" and any(value is not None for value in budget.model_dump().values()):
        raise ValueError("collapse.metric=exact merges exact copies only: it has no size to budget")
    if section.epoch_fraction is not None and "epoch_idx" in section.model_fields_set:
        raise ValueError("collapse.epoch_fraction sets collapse.epoch_idx from the run's length: give one of them")
    if section.metric == "basis" and section.fit_steps < MIN_SAMPLES:
        raise ValueError(
            f"collapse.fit_steps={section.fit_steps}: a basis of the activations needs at least {MIN_SAMPLES} "
            "agent steps"
        )


Size = Literal["params", "macs"]


def sweep_space(size: Size = "params") -> dict[str, tuple[float, float, float]]:
    """What both runtimes' sweeps search, by override path: (min, max, search centre), logit-normal in (0, 1);
    `size`: which budget sizes the collapse, the kept fraction of the parameters or of the multiply-adds."""
    return {f"collapse.budget.{size}": (0.05, 0.9, 0.3), "collapse.epoch_fraction": (0.2, 0.8, 0.5)}


def epoch_at_fraction(fraction: float, epochs: int, interval: int = 1) -> int:
    """`collapse.epoch_fraction`'s epoch: ⌊fraction × epochs⌋ rounded down to a multiple of `interval` (a
    checkpoint of the baseline a sweep's trials branch from), at least one interval."""
    interval = max(interval, 1)
    return max(interval, int(fraction * epochs + 1e-9) // interval * interval)  # 0.4999999 x 12 is 6
