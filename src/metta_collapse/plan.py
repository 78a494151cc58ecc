"""What a collapse will do: feature spaces and their partitions, per-parameter axis maps, and the report."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from metta_collapse.cluster import canonical, count

Demand = Callable[[str, np.ndarray], None]
Kept = Callable[[str], np.ndarray]


class Space:
    """The feature axis of a tensor: which units it has and which of them are copies of each other."""

    n: int

    def labels(self) -> np.ndarray: ...

    def scales(self) -> np.ndarray:
        """Per unit, the multiple of its label's unit it stands for when folded (1: a copy)."""
        return np.ones(self.n)

    def select(self, kept: Kept) -> np.ndarray:
        """Indices of the units a random ablation keeps, given the kept units of every layer."""

    def refine(self, labels: np.ndarray, demand: Demand) -> None:
        """Ask the layers producing this space to split their fibers at least as finely as `labels`."""

    def units(self) -> Iterator["Units"]:
        """The layers' units this space is made of."""
        return iter(())


@dataclass(eq=False)
class Distinct(Space):
    n: int

    def labels(self) -> np.ndarray:
        return np.arange(self.n)

    def select(self, kept: Kept) -> np.ndarray:
        return np.arange(self.n)

    def refine(self, labels: np.ndarray, demand: Demand) -> None:
        pass


@dataclass(eq=False)
class Units(Space):
    """The output units of one layer (for an LSTM or GRU: the hidden units of one layer)."""

    key: str
    n: int
    partition: np.ndarray
    scale: np.ndarray | None = None

    def labels(self) -> np.ndarray:
        return self.partition

    def scales(self) -> np.ndarray:
        return np.ones(self.n) if self.scale is None else self.scale

    def select(self, kept: Kept) -> np.ndarray:
        return kept(self.key)

    def units(self) -> Iterator["Units"]:
        yield self

    def refine(self, labels: np.ndarray, demand: Demand) -> None:
        demand(self.key, labels)


@dataclass(eq=False)
class Flattened(Space):
    """Channels flattened with their spatial positions: unit (c, p) has color (color(c), p)."""

    channels: Space
    positions: int

    @property
    def n(self) -> int:
        return self.channels.n * self.positions

    def _expand(self, per_channel: np.ndarray) -> np.ndarray:
        return (per_channel[:, None] * self.positions + np.arange(self.positions)[None, :]).ravel()

    def labels(self) -> np.ndarray:
        return self._expand(self.channels.labels())

    def select(self, kept: Kept) -> np.ndarray:
        return self._expand(self.channels.select(kept))

    def scales(self) -> np.ndarray:
        return np.repeat(self.channels.scales(), self.positions)

    def refine(self, labels: np.ndarray, demand: Demand) -> None:
        per_position = np.asarray(labels).reshape(self.channels.n, self.positions)
        self.channels.refine(canonical(*per_position.T), demand)

    def units(self) -> Iterator[Units]:
        return self.channels.units()


@dataclass(eq=False)
class Joined(Space):
    """Spaces concatenated along the feature axis."""

    parts: list[Space]

    @property
    def n(self) -> int:
        return sum(part.n for part in self.parts)

    def _offsets(self, pieces: list[np.ndarray], sizes: list[int]) -> np.ndarray:
        offsets = np.cumsum([0, *sizes[:-1]])
        return np.concatenate([piece + offset for piece, offset in zip(pieces, offsets, strict=True)])

    def labels(self) -> np.ndarray:
        pieces = [part.labels() for part in self.parts]
        return self._offsets(pieces, [count(piece) for piece in pieces])

    def select(self, kept: Kept) -> np.ndarray:
        return self._offsets([part.select(kept) for part in self.parts], [part.n for part in self.parts])

    def scales(self) -> np.ndarray:
        return np.concatenate([part.scales() for part in self.parts])

    def refine(self, labels: np.ndarray, demand: Demand) -> None:
        for part, piece in zip(self.parts, np.split(labels, np.cumsum([p.n for p in self.parts])[:-1]), strict=True):
            part.refine(canonical(piece), demand)

    def units(self) -> Iterator[Units]:
        return (units for part in self.parts for units in part.units())


# gate blocks per hidden unit, by `nn.RNNBase.mode`
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass(eq=False)
class Gated(Space):
    """A recurrent layer's gate rows: `blocks` copies of its hidden units (PyTorch's order: LSTM i, f, g, o; GRU
    r, z, n)."""

    hidden: Space
    blocks: int = 4

    @property
    def n(self) -> int:
        return self.hidden.n * self.blocks

    def labels(self) -> np.ndarray:
        labels = self.hidden.labels()
        return np.concatenate([labels + block * count(labels) for block in range(self.blocks)])

    def select(self, kept: Kept) -> np.ndarray:
        chosen = self.hidden.select(kept)
        return np.concatenate([chosen + block * self.hidden.n for block in range(self.blocks)])

    def scales(self) -> np.ndarray:
        return np.tile(self.hidden.scales(), self.blocks)

    def units(self) -> Iterator[Units]:
        return self.hidden.units()


Role = Literal["out", "in"]


@dataclass
class AxisMap:
    axis: int
    role: Role  # "out": the axis holds the layer's own units (rows averaged); "in": its inputs (columns summed)
    space: Space


@dataclass
class ParamMap:
    name: str
    new_name: str
    shape: tuple[int, ...]
    axes: list[AxisMap]
    buffer: bool = False

    def new_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        for axis_map in self.axes:
            shape[axis_map.axis] = count(axis_map.space.labels())
        return tuple(shape)


@dataclass
class StateMap:
    """How a recurrent-state input maps: one hidden space per recurrent layer along its last axis.

    `layer_axis`: the state holds the layers along axis 0 (an `nn.LSTM`'s or `nn.GRU`'s h0); `stacked`: after the
    collapse the layers' states are concatenated along the last axis instead (see `RecurrentStack`)."""

    spaces: list[Space]
    layer_axis: bool
    stacked: bool
    module: str = ""


@dataclass
class LayerPlan:
    name: str
    kind: str
    width_before: int
    width_after: int
    partition: list[int]
    key: str = ""


@dataclass
class CollapsePlan:
    """The result of `analyze`: per layer the partition of its units, and how every parameter changes."""

    layers: list[LayerPlan]
    params_before: int
    params_after: int
    params: dict[str, ParamMap] = field(repr=False)
    modules: dict[str, str] = field(repr=False)  # module name -> "resize" or "stack"
    states: dict[str, StateMap] = field(repr=False)
    links: list[tuple[Units, Units]] = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    # Units key -> where its activations are read: ("node", fx node name, feature axis) or ("recurrent", module, layer)
    sources: dict[str, tuple] = field(default_factory=dict, repr=False)
    # multi-layer LSTM/GRU/RNN module -> the unit keys of its layers
    recurrent_layers: dict[str, list[str]] = field(default_factory=dict, repr=False)
    # set when the plan is applied: {old name: (new name, old tensor)}, and the units an ablation kept
    replaced: dict | None = field(default=None, repr=False)
    kept: dict[str, np.ndarray] | None = field(default=None, repr=False)
    fold: bool = field(default=False, repr=False)

    def units(self) -> dict[str, Units]:
        """Every layer's units the plan rewrites, by key."""
        used = [axis_map.space for param in self.params.values() for axis_map in param.axes]
        used += [space for state in self.states.values() for space in state.spaces]
        return {units.key: units for space in used for units in space.units()}

    def relabel(self, partitions: dict[str, np.ndarray], scales: dict[str, np.ndarray] | None = None) -> None:
        """Give layers new partitions (e.g. the units a selection keeps, the others labelled with the kept unit
        they fold into, as that unit times `scales`) and update the widths and parameter count."""
        units = self.units()
        for key, labels in partitions.items():
            units[key].partition = np.asarray(labels, dtype=np.int64)
            units[key].scale = None if scales is None else scales.get(key)
        for module, keys in self.recurrent_layers.items():
            # layers of different widths no longer fit one module: it becomes a RecurrentStack
            stacked = len({count(units[key].partition) for key in keys if key in units}) > 1
            if module in self.modules:
                self.modules[module] = "stack" if stacked else "resize"
            for param in self.params.values():
                if param.name.startswith(f"{module}.") and "_l" in param.name:
                    base, index = param.name.rsplit(".", 1)[1].rsplit("_l", 1)
                    param.new_name = f"{module}.layers.{index}.{base}_l0" if stacked else param.name
            for state in self.states.values():
                if state.module == module:
                    state.stacked = stacked
        for layer in self.layers:
            if layer.key in partitions:
                layer.partition = units[layer.key].partition.tolist()
                layer.width_after = count(units[layer.key].partition)
        self.params_after = self.params_before + sum(
            int(np.prod(m.new_shape())) - int(np.prod(m.shape)) for m in self.params.values() if not m.buffer
        )

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "width_before": layer.width_before,
                    "width_after": layer.width_after,
                    "partition": layer.partition,
                }
                for layer in self.layers
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        rows = [("layer", "kind", "before", "after", "kept")]
        for layer in self.layers:
            kept = layer.width_after / layer.width_before if layer.width_before else 1.0
            rows.append((layer.name, layer.kind, str(layer.width_before), str(layer.width_after), f"{kept:.1%}"))
        rows.append(("parameters", "", str(self.params_before), str(self.params_after), f"{self.kept_fraction:.1%}"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        align = [str.ljust, str.ljust, str.rjust, str.rjust, str.rjust]
        lines = ["  ".join(a(cell, w) for a, cell, w in zip(align, row, widths, strict=True)) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
