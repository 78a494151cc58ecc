"""Configuration of the engine: the collapse thresholds and metric, and what a model's inputs/outputs are."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Metric = Literal["cosine", "exact", "scale_aware"]
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


class CollapseConfig(_Strict):
    """`cosine`: the study's average linkage on cosine distance (default, keeps the study's thresholds' meaning).
    `exact`: exact fibration (rows equal within `tolerance`, relative). `scale_aware`: average linkage on
    2|vi - vj| / (|vi| + |vj|), which unlike cosine bounds the change of each unit's pre-activation, so
    (w, b) and (2w, 2b) stay apart. Under `cosine` and `scale_aware` a threshold of 0 means exact."""

    thresholds: Thresholds = Field(default_factory=Thresholds)
    metric: Metric = "cosine"
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
