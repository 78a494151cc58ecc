"""Reports over finished or running runs, read from their folders under the train dir.

Symmetry over training: what a collapse at given thresholds would keep at each checkpoint of a run, per layer and
in total. Comparison: the learning curves of several runs (e.g. the baseline and its collapsed, ablated and
scratch arms) on one figure, with a summary table of size, final level, area after the collapse and recovery.
"""

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy.integrate import trapezoid

import metta_collapse as mc
from metta_collapse.training.checkpoint import (
    checkpoint_epochs,
    latest_checkpoint,
    load_checkpoint,
    policy_from_checkpoint,
)
from metta_collapse.training.collapse import analyze_policy
from metta_collapse.training.config import ConfigError
from metta_collapse.training.metrics import read_metrics

X_KEYS = {"agent_step": "metric/agent_step", "wall_time": "metric/total_time"}
X_LABELS = {"agent_step": "agent steps", "wall_time": "wall time (s)"}


def list_runs(train_dir: Path) -> list[str]:
    """Folders under `train_dir` that hold checkpoints or metrics."""
    if not train_dir.is_dir():
        return []
    return sorted(
        path.name
        for path in train_dir.iterdir()
        if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()
    )


def find_run(target: str, train_dir: Path) -> Path:
    """A run's folder from its name under `train_dir` or from its path."""
    # a bare name means the run under the train dir even if the current directory has a folder of that name
    for candidate in (train_dir / target, Path(target)):
        if candidate.is_dir():
            return candidate.resolve()
    runs = ", ".join(list_runs(train_dir)) or ("(none)" if train_dir.is_dir() else "(none: it does not exist)")
    raise ConfigError(
        f"{target!r} is neither a checkpoint file nor a run directory nor a run under {train_dir}; runs there: {runs}"
    )


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints in epoch order; files not named exactly like one (the pre-collapse copy) are skipped."""
    epochs = checkpoint_epochs(run_dir / "checkpoints", run_dir.name)
    if not epochs:
        raise ConfigError(f"run {run_dir.name!r} has no checkpoints in {run_dir / 'checkpoints'}")
    return [epochs[epoch] for epoch in sorted(epochs)]


def read_checkpoint(path: Path) -> dict:
    try:
        checkpoint = load_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "architecture" not in checkpoint:
        raise ConfigError(f"{path} is not a metta-collapse checkpoint (it has no policy architecture)")
    return checkpoint


def analyze_checkpoint(path: Path, config: mc.CollapseConfig) -> tuple[dict, mc.CollapsePlan]:
    checkpoint = read_checkpoint(path)
    return checkpoint, analyze_policy(policy_from_checkpoint(checkpoint), config)


def describe_config(config: mc.CollapseConfig) -> str:
    thresholds = " ".join(f"{name}={value}" for name, value in config.thresholds.model_dump().items())
    return f"{config.metric}, thresholds {thresholds}"


def symmetry_curve(
    run_dir: Path,
    config: mc.CollapseConfig,
    every: int = 1,
    progress: Callable[[Path, int, int], None] | None = None,
) -> dict:
    """What a collapse with `config` would keep at every `every`-th checkpoint of the run, and at its last.

    `progress(path, done, total)` is called after each checkpoint."""
    checkpoints = run_checkpoints(run_dir)
    chosen = checkpoints[::every]
    if chosen[-1] != checkpoints[-1]:
        chosen.append(checkpoints[-1])
    points = []
    for done, path in enumerate(chosen, 1):
        checkpoint, plan = analyze_checkpoint(path, config)
        points.append(
            {
                "checkpoint": path.name,
                "epoch": checkpoint["epoch"],
                "agent_step": checkpoint["agent_step"],
                "wall_time": checkpoint["wall_time"],
                "params_before": plan.params_before,
                "params_after": plan.params_after,
                "kept_fraction": plan.kept_fraction,
                "layers": {
                    layer.name: {
                        "kind": layer.kind,
                        "width_before": layer.width_before,
                        "width_after": layer.width_after,
                        "kept_fraction": layer.width_after / layer.width_before if layer.width_before else 1.0,
                    }
                    for layer in plan.layers
                },
            }
        )
        if progress is not None:
            progress(path, done, len(chosen))
    return {"run": run_dir.name, "config": config.model_dump(), "points": points}


def format_table(rows: list[tuple[str, ...]]) -> str:
    """First column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def symmetry_table(curve: dict) -> str:
    rows = [("epoch", "agent_step", "params", "kept params", "kept fraction")]
    for point in curve["points"]:
        rows.append(
            (
                str(point["epoch"]),
                str(point["agent_step"]),
                str(point["params_before"]),
                str(point["params_after"]),
                f"{point['kept_fraction']:.3f}",
            )
        )
    return format_table(rows)


def plot_symmetry(curve: dict) -> Figure:
    """Kept fraction vs agent steps: one thin line per layer (kept units), a thick one for all parameters."""
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.subplots()
    points = curve["points"]
    names = list(dict.fromkeys(name for point in points for name in point["layers"]))
    colors = colormaps["tab20"]
    for index, name in enumerate(names):
        present = [point for point in points if name in point["layers"]]
        steps = [point["agent_step"] for point in present]
        fractions = [point["layers"][name]["kept_fraction"] for point in present]
        axes.plot(steps, fractions, label=name, linewidth=1.2, color=colors(index % colors.N))
    steps = [point["agent_step"] for point in points]
    kept = [point["kept_fraction"] for point in points]
    axes.plot(steps, kept, label="parameters", color="black", linewidth=2.5, marker="o")
    axes.set_xlabel("agent steps")
    axes.set_ylabel("fraction a collapse would keep")
    axes.set_ylim(0, 1.05)
    axes.set_title(f"{curve['run']}: symmetry over training ({describe_config(mc.CollapseConfig(**curve['config']))})")
    axes.legend(fontsize="small", ncols=2)
    axes.grid(alpha=0.3)
    return figure


@dataclass
class Run:
    name: str
    directory: Path
    metrics: list[dict]
    collapse: dict | None  # collapse.json, when the run was collapsed


@dataclass
class Curve:
    name: str
    x: np.ndarray
    y: np.ndarray
    smoothed: np.ndarray
    collapse_x: float | None  # the run's own collapse


def load_run(target: str, train_dir: Path) -> Run:
    run_dir = find_run(target, train_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"run {run_dir.name!r} has no metrics: {path} does not exist")
    metrics = read_metrics(path)
    if not metrics:
        raise ConfigError(f"run {run_dir.name!r} has no metrics: {path} is empty")
    collapse_path = run_dir / "collapse.json"
    collapse = json.loads(collapse_path.read_text()) if collapse_path.is_file() else None
    return Run(run_dir.name, run_dir, metrics, collapse)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (no look-ahead); the first points average the points there are so far."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    sizes = np.minimum(ends, window)
    return (sums[ends] - sums[ends - sizes]) / sizes


def learning_curve(run: Run, x: str, y: str, window: int = 1) -> Curve:
    x_key = X_KEYS[x]
    pairs = [(line[x_key], line[y]) for line in run.metrics if x_key in line and line.get(y) is not None]
    if not pairs:
        logged = ", ".join(sorted(set().union(*run.metrics)))
        raise ConfigError(f"unknown metric {y!r}: run {run.name!r} logged {logged}")
    xs, ys = (np.array(values, dtype=float) for values in zip(*pairs, strict=True))
    collapse_x = None
    if run.collapse is not None:
        step = float(run.collapse["agent_step"])
        if x == "agent_step":
            collapse_x = step
        else:
            steps, times = zip(
                *((line["metric/agent_step"], line[x_key]) for line in run.metrics if x_key in line), strict=True
            )
            collapse_x = float(np.interp(step, steps, times))
    if collapse_x is None:
        smoothed = smooth(ys, window)
    else:
        # the collapse changes the policy: a window reaching across it would hide the drop it causes
        before = xs <= collapse_x
        smoothed = np.concatenate([smooth(ys[before], window), smooth(ys[~before], window)])
    return Curve(run.name, xs, ys, smoothed, collapse_x)


def run_params(run: Run) -> int | None:
    """Parameters after the collapse, or those of the run's latest checkpoint; None without either."""
    if run.collapse is not None:
        return int(run.collapse["params_after"])
    path = latest_checkpoint(run.directory / "checkpoints", run.name)
    if path is None:
        return None
    return sum(param.numel() for param in policy_from_checkpoint(read_checkpoint(path)).parameters())


def compare_summary(runs: list[Run], curves: list[Curve], x: str, y: str, last: int, baseline: str | None) -> dict:
    """Per run: parameters, mean y over the last `last` epochs, area under y after the collapse, and how long after
    the collapse its (smoothed) y first reaches the baseline's mean over the `last` epochs before the collapse.

    The collapse of a run without one is that of the first collapsed run not trained from scratch (a scratch run's
    "collapse" is at step 0); the baseline is `baseline` or else the first run without a collapse."""
    reference = next(
        (
            curve.collapse_x
            for run, curve in zip(runs, curves, strict=True)
            if run.collapse is not None and run.collapse.get("mode") != "scratch"
        ),
        None,
    )
    if baseline is None:
        baseline = next((run.name for run in runs if run.collapse is None), None)
    target = None
    if baseline is not None and reference is not None:
        base = next(curve for curve in curves if curve.name == baseline)
        before = base.y[base.x <= reference][-last:]
        target = float(before.mean()) if len(before) else None
    rows = []
    for run, curve in zip(runs, curves, strict=True):
        start = curve.collapse_x if curve.collapse_x is not None else reference
        after = curve.x >= start if start is not None else np.ones(len(curve.x), dtype=bool)
        area = float(trapezoid(curve.y[after], curve.x[after])) if after.sum() >= 2 else None
        recover = None
        if target is not None and start is not None and run.name != baseline:
            reached = (curve.x > start) & (curve.smoothed >= target)
            recover = float(curve.x[reached][0] - start) if reached.any() else None
        rows.append(
            {
                "run": run.name,
                "mode": run.collapse.get("mode") if run.collapse else None,
                "params": run_params(run),
                "collapse_x": curve.collapse_x,
                "last_mean": float(curve.y[-last:].mean()),
                "auc_after_collapse": area,
                "to_recover": recover,
            }
        )
    return {
        "x": x,
        "y": y,
        "last": last,
        "baseline": baseline,
        "collapse_x": reference,
        "baseline_before_collapse": target,
        "runs": rows,
    }


def compare_table(summary: dict) -> str:
    x_unit, decimals = ("agent steps", 0) if summary["x"] == "agent_step" else ("s", 1)
    rows = [
        (
            "run",
            "mode",
            "params",
            f"last {summary['last']} mean",
            "AUC after collapse",
            f"to recover ({x_unit})",
        )
    ]
    for row in summary["runs"]:
        is_baseline = row["run"] == summary["baseline"]
        recover = "never" if row["to_recover"] is None else f"{row['to_recover']:,.{decimals}f}"
        rows.append(
            (
                row["run"],
                "baseline" if is_baseline else row["mode"] or "-",
                "-" if row["params"] is None else f"{row['params']:,}",
                f"{row['last_mean']:.4g}",
                "-" if row["auc_after_collapse"] is None else f"{row['auc_after_collapse']:.4g}",
                "-" if is_baseline else recover,
            )
        )
    lines = [f"{summary['y']} vs {summary['x']}"]
    target = summary["baseline_before_collapse"]
    if target is not None:
        lines.append(
            f"baseline {summary['baseline']}, mean over the {summary['last']} epochs up to the collapse at "
            f"{summary['collapse_x']:,.{decimals}f}: {target:.4g}"
        )
    else:
        # no baseline level to reach: the column would only say "never"
        rows = [row[:-1] for row in rows]
    return "\n".join([*lines, format_table(rows)])


def plot_compare(curves: list[Curve], summary: dict, window: int = 1) -> Figure:
    """The learning curves (smoothed, raw ones faint behind), each collapse as a dashed line in its run's colour."""
    figure = Figure(figsize=(10, 6), layout="constrained")
    axes = figure.subplots()
    for index, (curve, row) in enumerate(zip(curves, summary["runs"], strict=True)):
        color = f"C{index}"
        if window > 1:
            axes.plot(curve.x, curve.y, color=color, alpha=0.25, linewidth=0.8)
        params = "" if row["params"] is None else f" ({row['params']:,} params)"
        axes.plot(curve.x, curve.smoothed, color=color, linewidth=1.8, label=f"{curve.name}{params}")
        if curve.collapse_x is not None:
            axes.axvline(curve.collapse_x, color=color, linestyle="--", linewidth=1, label=f"{curve.name} collapse")
    if summary["baseline_before_collapse"] is not None:
        axes.axhline(
            summary["baseline_before_collapse"],
            color="gray",
            linestyle=":",
            label=f"{summary['baseline']} before the collapse",
        )
    axes.set_xlabel(X_LABELS[summary["x"]])
    axes.set_ylabel(summary["y"] if window == 1 else f"{summary['y']} (moving average of {window})")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure
