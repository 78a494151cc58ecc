"""Units chosen from data: per layer, the units whose recorded activations form a basis of what the data
exercises (pivoted QR of the centred samples × units matrix), the others to be folded into them by `refit`.

An exact fibration is the lossless case: the units of one fiber have identical activation columns, so a basis
keeps one of them. The layers are those `analyze` finds; which of them may shrink, and which must keep the same
units (outputs meeting element-wise), comes from the same analysis."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import fx, nn

from metta_collapse.activations import record, recurrent_trajectories
from metta_collapse.analysis import analyze
from metta_collapse.config import MIN_SAMPLES, CollapseConfig, ModelSpec, RankTol, Thresholds
from metta_collapse.errors import CollapseError
from metta_collapse.graph import as_graph
from metta_collapse.plan import CollapsePlan
from metta_collapse.rewrite import linked_groups

# below this many samples (rows: agent steps, times spatial positions for a convolution) a basis says little
MERGE_ALL = Thresholds(linear=2.0, cnn=2.0, lstm=2.0, critic=2.0)


@dataclass
class Basis:
    """One layer's (or linked group's) units in pivot order and the relative residual of keeping the first k."""

    keys: list[str]
    kind: str
    order: np.ndarray
    residual: np.ndarray  # residual[k], k = 0..n
    gram: np.ndarray  # of the centred activations
    norms: np.ndarray  # the square roots of its diagonal

    def width(self, tolerance: float) -> int:
        return max(1, int(np.argmax(self.residual <= tolerance)))

    def labels(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept units (sorted), every unit's label — a kept unit its position, another the kept unit its
        activations correlate with most (what it is folded into) — and the regression coefficient of each unit
        on its label's unit (1 for a kept unit and for an exact copy)."""
        kept = np.sort(self.order[:width])
        correlation = self.gram[kept] / self.norms[kept, None] / self.norms[None, :]
        labels = np.argmax(np.abs(correlation), axis=0)
        scales = self.gram[kept[labels], np.arange(len(labels))] / self.norms[kept[labels]] ** 2
        labels[kept], scales[kept] = np.arange(width), 1.0
        return kept, labels, scales


def structure(
    model: nn.Module, inputs: tuple, spec: ModelSpec | None, graph: fx.GraphModule | None
) -> tuple[CollapsePlan, set[str]]:
    """The plan's layers with every unit merged that the model allows; the keys of the layers that may shrink."""
    plan = analyze(model, inputs, CollapseConfig(thresholds=MERGE_ALL), spec, graph)
    return plan, {layer.key for layer in plan.layers if layer.width_after < layer.width_before}


def activations(
    model: nn.Module, plan: CollapsePlan, data: tuple, keys: set[str], graph: fx.GraphModule | None = None
) -> dict[str, torch.Tensor]:
    """Each layer's activations on `data`, (samples, units): the tensor its units feed forward (after their
    nonlinearity); a recurrent layer's hidden states over time."""
    graph = as_graph(model, graph)
    recurrent_nodes = {n.target: n.name for n in graph.graph.nodes if n.op == "call_module"}
    wanted = {
        key: plan.sources[key][1] if plan.sources[key][0] == "node" else recurrent_nodes[plan.sources[key][1]]
        for key in keys
    }
    seen = record(graph, model, data, set(wanted.values()))
    out = {}
    for key, node in wanted.items():
        source = plan.sources[key]
        if source[0] == "node":
            value, axis = seen[node][1], source[2]
        else:
            value = recurrent_trajectories(model.get_submodule(source[1]), seen[node][0])[source[2]][2]
            axis = -1
        out[key] = value.movedim(axis, -1).reshape(-1, value.shape[axis])
    return out


def pivoted_basis(
    columns: list[torch.Tensor], held_out: list[torch.Tensor] | None, keys: list[str], kind: str, strength: float
) -> Basis:
    """The units in the order of a pivoted Cholesky factorisation of the centred activations' Gram matrix (the
    pivots of a pivoted QR of the activations, at a cost independent of the number of samples: each next unit
    is the one least explained by those before it). The residual of keeping k units is that of the best
    ridge reconstruction of every unit from them, fitted on `columns` and measured on `held_out`: on the data
    it was fitted on, a layer's span understates what other maps exercise."""
    a = torch.cat([c.double() for c in columns], dim=0)
    mean = a.mean(0)
    gram = ((a - mean).T @ (a - mean)).numpy()
    n = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    if np.trace(gram) <= 0.0:  # no unit varies: one is enough
        return Basis(keys, kind, np.arange(n), np.zeros(n + 1), gram, norms)
    _, pivots, _, _ = scipy.linalg.lapack.dpstrf(gram, lower=1)
    order = pivots - 1
    test = gram
    if held_out is not None:
        b = torch.cat([c.double() for c in held_out], dim=0) - mean
        test = (b.T @ b).numpy()
    return Basis(keys, kind, order, _residuals(gram, test, order, strength), gram, norms)


def _residuals(gram: np.ndarray, test: np.ndarray, order: np.ndarray, strength: float) -> np.ndarray:
    """residual[k]: the relative error, on the data of `test`, of rebuilding every unit from the first k pivots
    by ridge regression fitted on `gram` (both centred Gram matrices); computed at every k up to 32 and at
    about 24 k's beyond, between which a width counts as the smaller grid point (never understated)."""
    n = len(order)
    gram, test = gram[np.ix_(order, order)], test[np.ix_(order, order)]
    total = float(np.trace(test)) or 1.0
    lam = strength * float(np.trace(gram)) / n + 1e-12
    # the leading k x k block of this factor is the factor of the first k units' ridge Gram matrix
    factor = scipy.linalg.cholesky(gram + lam * np.eye(n), lower=True)
    grid = np.unique(np.concatenate([np.arange(1, min(n, 32) + 1), np.geomspace(32, n, 24).round().astype(int)]))
    at_grid = []
    for k in grid[grid < n]:
        coefficients = scipy.linalg.cho_solve((factor[:k, :k], True), gram[:k, k:])
        error = (
            np.trace(test[k:, k:])
            - 2 * np.sum(coefficients * test[:k, k:])
            + np.sum(coefficients * (test[:k, :k] @ coefficients))
        )
        at_grid.append(np.sqrt(max(error, 0.0) / total))
    grid = np.append(grid[grid < n], n)
    # a width is accepted only if every larger one is too
    at_grid = np.maximum.accumulate(np.array([*at_grid, 0.0])[::-1])[::-1]
    residual = np.ones(n + 1)
    residual[1:] = at_grid[np.searchsorted(grid, np.arange(1, n + 1), side="right") - 1]
    return residual


def bases(
    model: nn.Module,
    plan: CollapsePlan,
    free: set[str],
    data: tuple,
    held_out: tuple | None = None,
    graph: fx.GraphModule | None = None,
    strength: float = 1e-6,
) -> list[Basis]:
    acts = activations(model, plan, data, free, graph)
    short = {key: len(a) for key, a in acts.items() if len(a) < max(MIN_SAMPLES, a.shape[1])}
    if short:
        raise CollapseError(
            f"a basis of the activations needs at least {MIN_SAMPLES} samples and one per unit; got {short} "
            "(give recorded rollouts, not an example input)"
        )
    held = activations(model, plan, held_out, free, graph) if held_out is not None else None
    kinds = {layer.key: layer.kind for layer in plan.layers}
    groups: dict[str, list[str]] = {}
    for key, group in linked_groups(plan).items():
        if key in free:
            groups.setdefault(group, []).append(key)
    return [
        pivoted_basis(
            [acts[k] for k in keys], None if held is None else [held[k] for k in keys], keys, kinds[keys[0]], strength
        )
        for keys in groups.values()
    ]


def apply_widths(plan: CollapsePlan, found: list[Basis], widths: list[int]) -> dict[str, np.ndarray]:
    """Relabel `plan` with the bases cut to `widths`; returns the kept units per layer (for `keep`)."""
    kept, partitions, scales = {}, {}, {}
    for basis, width in zip(found, widths, strict=True):
        units, labels, scale = basis.labels(width)
        for key in basis.keys:
            kept[key], partitions[key], scales[key] = units, labels, scale
    for key, units in plan.units().items():
        if key not in kept:
            kept[key] = np.arange(units.n)
            partitions[key] = np.arange(units.n)
    plan.relabel(partitions, scales)
    return kept


def widths_at(found: list[Basis], rank_tol: RankTol, scale: float) -> list[int]:
    tolerances = rank_tol.scaled(scale)
    return [basis.width(tolerances[basis.kind]) for basis in found]


def smallest_scale(ok: Callable[[float], bool], low: float, high: float, what: str, steps: int = 24) -> float:
    """The smallest scale of a size knob in [low, high] (log-bisected) for which `ok` holds, `ok` being monotone:
    the largest collapse within a budget."""
    if not ok(high):
        raise CollapseError(f"{what}: not reached even at the smallest size the knob allows")
    if ok(low):
        return low
    for _ in range(steps):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if ok(middle) else (middle, high)
    return high


def scale_within(
    plan: CollapsePlan, found: list[Basis], rank_tol: RankTol, within: Callable[[CollapsePlan], bool], what: str
) -> float:
    """The smallest scale of `rank_tol` whose plan is `within` a size budget (e.g. keeps at most a fraction of the
    parameters)."""

    def ok(scale: float) -> bool:
        apply_widths(plan, found, widths_at(found, rank_tol, scale))
        return within(plan)

    high = 1.0 / min(rank_tol.model_dump().values())  # every tolerance 1: one unit a layer
    return smallest_scale(ok, 1e-6, high, what)


def select_basis(
    model: nn.Module,
    data: tuple,
    spec: ModelSpec | None = None,
    rank_tol: RankTol | None = None,
    params: float | None = None,
    held_out: tuple | None = None,
    graph: fx.GraphModule | None = None,
    example: tuple | None = None,
) -> tuple[CollapsePlan, dict[str, np.ndarray], dict]:
    """Choose, per layer, a basis of the activations on `data` (recorded inputs of the model, at least
    `MIN_SAMPLES` samples), its width judged on `held_out` (inputs of other rollouts; without them, on `data`):
    as wide as `rank_tol` asks or, with `params`, as wide as keeps at most that fraction of the parameters
    (one scale on every kind's tolerance). `example`: a small input for the weight-only analysis of the
    layers (default: `data`). Pure. Returns the plan, the kept units per layer (apply with
    `keep`, then `refit`) and the tolerances used."""
    rank_tol = rank_tol or RankTol()
    data = tuple(data) if isinstance(data, tuple | list) else (data,)
    plan, free = structure(model, example or data, spec, graph)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        found = bases(model, plan, free, data, held_out, graph)
    finally:
        for module, training in modes.items():
            module.training = training
    if params is None:
        scale = 1.0
    else:
        scale = scale_within(plan, found, rank_tol, lambda p: p.kept_fraction <= params, f"budget.params={params}")
    kept = apply_widths(plan, found, widths_at(found, rank_tol, scale))
    chosen = {"rank_tol": rank_tol.scaled(scale), "scale": scale}
    return plan, kept, chosen
