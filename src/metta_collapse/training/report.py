"""Reports over finished or running runs, read from their folders under the train dir.

Symmetry over training: what a collapse at given thresholds would keep at each checkpoint of a run, per layer and
in total. Comparison: the learning curves of several runs (e.g. the baseline and its collapsed, ablated and
scratch arms) on one figure, with a summary table of size, final level, area after the collapse and recovery.
"""

import json
import pickle
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
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
from metta_collapse.training.stats import (
    format_interval,
    format_spread,
    level_before_cut,
    paired_difference,
    rliable_summary,
    steps_to_regain,
)

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
    """The metric and the settings it uses."""
    if config.metric == "exact":
        return f"exact, tolerance {config.tolerance}"
    thresholds = " ".join(f"{name}={value}" for name, value in config.thresholds.model_dump().items())
    return f"{config.metric}, thresholds {thresholds}"


def checkpoint_state(checkpoint: dict) -> str:
    """Whether the checkpoint's policy is already collapsed, as its record says."""
    record = checkpoint.get("extra", {}).get("collapse")
    if record is None:
        return "not collapsed"
    return (
        f"already collapsed ({record['mode']}) at epoch {record['epoch']}: {record['params_before']:,} -> "
        f"{record['params_after']:,} parameters"
    )


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
    points, original, collapsed_at = [], None, None
    for done, path in enumerate(chosen, 1):
        checkpoint, plan = analyze_checkpoint(path, config)
        record = checkpoint.get("extra", {}).get("collapse")
        if record is not None and collapsed_at is None:
            collapsed_at = record["agent_step"]
        # fractions of the network the run started with: across a collapse the checkpoint's own network shrinks
        original = original or {
            "params": record["params_before"] if record else plan.params_before,
            **{layer["name"]: layer["width_before"] for layer in (record or {}).get("layers", [])},
            **({} if record else {layer.name: layer.width_before for layer in plan.layers}),
        }
        points.append(
            {
                "checkpoint": path.name,
                "epoch": checkpoint["epoch"],
                "agent_step": checkpoint["agent_step"],
                "wall_time": checkpoint["wall_time"],
                "collapsed": record is not None,
                "params_before": plan.params_before,
                "params_after": plan.params_after,
                "kept_fraction": plan.params_after / original["params"],
                "layers": {
                    layer.name: {
                        "kind": layer.kind,
                        "width_before": layer.width_before,
                        "width_after": layer.width_after,
                        "kept_fraction": layer.width_after / original.get(layer.name, layer.width_before)
                        if layer.width_before
                        else 1.0,
                    }
                    for layer in plan.layers
                },
            }
        )
        if progress is not None:
            progress(path, done, len(chosen))
    return {
        "run": run_dir.name,
        "config": config.model_dump(),
        "original_params": original["params"],
        "collapsed_at": collapsed_at,
        "points": points,
    }


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
    """Per checkpoint: parameters a collapse would keep, of the run's original network, and each layer's units."""
    names = list(dict.fromkeys(name for point in curve["points"] for name in point["layers"]))
    rows = [("epoch", "agent_step", "params", "would keep", "of original", *names)]
    for point in curve["points"]:
        layers = point["layers"]
        rows.append(
            (
                f"{point['epoch']}{'*' if point['collapsed'] else ''}",
                str(point["agent_step"]),
                str(point["params_before"]),
                str(point["params_after"]),
                f"{point['kept_fraction']:.3f}",
                *(
                    f"{layers[name]['width_after']}/{layers[name]['width_before']}" if name in layers else "-"
                    for name in names
                ),
            )
        )
    note = f"of original: of the run's {curve['original_params']:,} parameters before any collapse"
    if curve["collapsed_at"] is not None:
        note += f"; * a checkpoint already collapsed (at agent step {curve['collapsed_at']:,})"
    return format_table(rows) + f"\n{note}; layers: units kept/units now"


def plot_symmetry(curve: dict) -> Figure:
    """Kept fraction of the original network vs agent steps: a thick line for all parameters, a thin one per layer
    (layers whose lines coincide share one), the collapse marked."""
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.subplots()
    points = curve["points"]
    names = list(dict.fromkeys(name for point in points for name in point["layers"]))
    series: dict[tuple, list[str]] = {}
    for name in names:
        line = tuple(
            (point["agent_step"], round(point["layers"][name]["kept_fraction"], 6))
            for point in points
            if name in point["layers"]
        )
        series.setdefault(line, []).append(name)
    colors = colormaps["tab20"]
    for index, (line, members) in enumerate(series.items()):
        steps, fractions = zip(*line, strict=True)
        label = ", ".join(members) if len(members) < 4 else f"{', '.join(members[:3])} +{len(members) - 3}"
        axes.plot(steps, fractions, label=label, linewidth=1.2, color=colors(index % colors.N), marker=".")
    steps = [point["agent_step"] for point in points]
    kept = [point["kept_fraction"] for point in points]
    axes.plot(steps, kept, label="parameters", color="black", linewidth=2.5, marker="o")
    if curve["collapsed_at"] is not None:
        axes.axvline(curve["collapsed_at"], color="gray", linestyle="--", label="the run's collapse")
    axes.set_xlabel("agent steps")
    axes.xaxis.set_major_formatter(EngFormatter(sep=""))
    axes.set_ylabel("fraction of the original network a collapse would keep")
    axes.set_ylim(0, 1.05)
    config = describe_config(mc.CollapseConfig(**curve["config"]))
    axes.set_title(f"{curve['run']}: symmetry over training\n({config})", fontsize="medium")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)
    return figure


@dataclass
class Run:
    name: str
    directory: Path
    metrics: list[dict]
    collapse: dict | None  # collapse.json, when the run was collapsed
    seed: int | None = None  # from config.json: arms are paired by it


@dataclass
class Curve:
    name: str
    x: np.ndarray
    y: np.ndarray
    smoothed: np.ndarray
    collapse_x: float | None  # the run's own collapse
    window: int = 1  # of the moving average


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
    config_path = run_dir / "config.json"
    seed = json.loads(config_path.read_text()).get("seed") if config_path.is_file() else None
    return Run(run_dir.name, run_dir, metrics, collapse, seed)


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
    return Curve(run.name, xs, ys, smoothed, collapse_x, window)


def run_params(run: Run) -> int | None:
    """Parameters after the collapse, or those of the run's latest checkpoint; None without either."""
    if run.collapse is not None:
        return int(run.collapse["params_after"])
    path = latest_checkpoint(run.directory / "checkpoints", run.name)
    if path is None:
        return None
    return sum(param.numel() for param in policy_from_checkpoint(read_checkpoint(path)).parameters())


def arm(run: Run, baselines: Collection[str]) -> str:
    """A short label for the run's arm: what was done to it, not its name."""
    if run.name in baselines or run.collapse is None:
        return "baseline" if run.name in baselines else "uncollapsed"
    record = run.collapse
    # a fibration's arm is its choice of units
    label = record.get("metric", "fibration") if record.get("mode") == "fibration" else record.get("mode")
    size = next((f"{key} {value}" for key, value in (record.get("budget") or {}).items() if value is not None), None)
    plain = "" if record.get("refit", True) else " plain"
    return f"{label}{plain}" + (f", {size}" if size else "")


def compare_summary(
    runs: list[Run], curves: list[Curve], x: str, y: str, last: int, baseline: str | None, group: bool = False
) -> dict:
    """Per run, all from the cut (the first collapsed run's collapse, not a scratch run's): the mean y over its
    last `last` epochs after the cut, the difference from its seed's baseline's, the area under y over the span after
    the cut that every run covers, and how long after the cut its y, averaged over up to the curve's window of epochs
    after the cut, first reaches its seed's baseline level, that baseline's mean over the `last` epochs up to the cut
    (`stats.steps_to_regain`); the record's parameters kept, KL and value error. A seed's baseline is `baseline` for
    its seed, else the first run without a collapse of that seed (seeds from config.json); a run whose seed has none
    gets no difference or recovery. A scratch run starts at the cut (its curve is moved there): it trains the small
    network while the branches train after the cut. With `group`, runs of one arm (seeds) are summarised together,
    mean and spread (standard deviation), and the arms' last means are compared seed by seed (`arm_statistics`)."""
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
    notes = []
    if baseline is None:
        notes.append("no baseline (a run without a collapse, or --baseline): no recovery or difference columns")
    if reference is not None:
        for run, curve in zip(runs, curves, strict=True):
            if run.collapse is not None and run.collapse.get("mode") == "scratch":
                curve.x, curve.collapse_x = curve.x + reference, reference
    end = min(float(curve.x[-1]) for curve in curves)
    named = next((run for run in runs if run.name == baseline), None)
    baselines = {} if named is None else {named.seed: named}
    for run in runs:
        if named is not None and run.collapse is None:
            baselines.setdefault(run.seed, run)
    names = {run.name for run in baselines.values()}
    curve_of = {curve.name: curve for curve in curves}
    levels = {
        seed: level_before_cut(curve_of[run.name].x, curve_of[run.name].y, reference, last)
        for seed, run in baselines.items()
        if reference is not None
    }
    rows = []
    for run, curve in zip(runs, curves, strict=True):
        after = curve.x > reference if reference is not None else np.ones(len(curve.x), dtype=bool)
        tail = curve.y[after][-last:]
        if len(tail) < last:
            notes.append(
                f"{run.name}: {len(tail)} epochs after the cut, fewer than --last {last}: the mean is of those"
            )
        if baselines and run.seed not in baselines:
            notes.append(f"{run.name}: no baseline run of its seed {run.seed}: no difference or recovery")
        window = (curve.x >= (reference or 0.0)) & (curve.x <= end)
        level = levels.get(run.seed)
        recover = None
        if run.name not in names and reference is not None:
            recover = steps_to_regain(curve.x, curve.y, reference, level, curve.window)
        record = run.collapse or {}
        if record.get("mode") == "scratch":  # its record compares the small network with its own random start
            record = {key: value for key, value in record.items() if key not in ("kl_mean", "value_err")}
        rows.append(
            {
                "run": run.name,
                "arm": arm(run, names),
                "seed": run.seed,
                "mode": record.get("mode"),
                "params": run_params(run),
                "kept": record["params_after"] / record["params_before"] if "params_before" in record else None,
                "kl_mean": record.get("kl_mean"),
                "value_err": record.get("value_err"),
                "collapse_x": curve.collapse_x,
                "last_mean": float(tail.mean()) if len(tail) else None,
                "auc": float(trapezoid(curve.y[window], curve.x[window])) if window.sum() >= 2 else None,
                "level": level,
                "to_recover": None if recover is None else float(recover),
            }
        )
    last_mean = {row["run"]: row["last_mean"] for row in rows}
    for run, row in zip(runs, rows, strict=True):
        base_mean = last_mean[baselines[run.seed].name] if run.seed in baselines else None
        row["difference"] = None if None in (base_mean, row["last_mean"]) else row["last_mean"] - base_mean
        row["difference_pct"] = (
            None if row["difference"] is None or not base_mean else row["difference"] / abs(base_mean)
        )
    summary = {
        "x": x,
        "y": y,
        "last": last,
        "baseline": baseline,
        "collapse_x": reference,
        "auc_span": None if reference is None else [reference, end],
        "baseline_before_collapse": None if named is None else levels.get(named.seed),
        "runs": rows,
        "notes": notes,
    }
    if group:
        summary["arms"] = group_rows(rows)
        summary.update(arm_statistics(summary["arms"], rows, notes))
    return summary


GROUPED = ("kept", "kl_mean", "value_err", "last_mean", "difference", "difference_pct", "auc", "level", "to_recover")


def group_rows(rows: list[dict]) -> list[dict]:
    """The runs of each arm together: the mean, standard deviation and number of runs of each measure, over the runs
    that have it; `to_recover` only if every run with a level to recover recovered."""
    arms = []
    for label in dict.fromkeys(row["arm"] for row in rows):
        members = [row for row in rows if row["arm"] == label]
        summary = {"arm": label, "runs": [row["run"] for row in members]}
        for key in GROUPED:
            counted = [row for row in members if key != "to_recover" or row["level"] is not None]
            values = [row[key] for row in counted if row[key] is not None]
            if key == "to_recover" and len(values) < len(counted):
                values = []  # a run that never recovered has no time to average in
            summary[key] = float(np.mean(values)) if values else None
            summary[f"{key}_std"] = float(np.std(values)) if values else None
            summary[f"{key}_n"] = len(values)
        arms.append(summary)
    return arms


def arm_statistics(arms: list[dict], rows: list[dict], notes: list[str]) -> dict:
    """Each arm's last means, seed by seed: its paired difference from the baseline's (in the arm's summary,
    `paired`) and from every other arm's, with 95 % bootstrap intervals; and rliable's interquartile mean per arm
    and probability of improvement of each arm over the baseline."""
    by_seed: dict[str, dict[int, float]] = {}
    for group in arms:
        by_seed[group["arm"]] = {}
        for row in rows:
            if row["arm"] == group["arm"] and row["seed"] is not None and row["last_mean"] is not None:
                if row["seed"] in by_seed[group["arm"]]:
                    notes.append(f"{group['arm']}: several runs of seed {row['seed']}: {row['run']} is paired")
                by_seed[group["arm"]][row["seed"]] = row["last_mean"]
        if len(by_seed[group["arm"]]) < len(group["runs"]):
            notes.append(f"{group['arm']}: only runs with a seed in config.json and a last mean are paired")
    labels = [group["arm"] for group in arms]
    has_baseline = "baseline" in labels
    for group in arms:
        paired = has_baseline and group["arm"] != "baseline"
        group["paired"] = paired_difference(by_seed[group["arm"]], by_seed["baseline"]) if paired else None
    others = [label for label in labels if label != "baseline"]
    between = [
        {"a": a, "b": b, **difference}
        for i, a in enumerate(others)
        for b in others[i + 1 :]
        if (difference := paired_difference(by_seed[a], by_seed[b])) is not None
    ]
    scores = {
        group["arm"]: [row["last_mean"] for row in rows if row["arm"] == group["arm"] and row["last_mean"] is not None]
        for group in arms
    }
    scores = {label: values for label, values in scores.items() if values}
    pairs = [(label, "baseline") for label in scores if label != "baseline"] if "baseline" in scores else []
    return {"paired_between_arms": between, "rliable": rliable_summary(scores, pairs) if scores else None}


def compare_table(summary: dict) -> str:
    x_unit, decimals = ("agent steps", 0) if summary["x"] == "agent_step" else ("s", 1)
    grouped = "arms" in summary
    has_baseline = summary["baseline"] is not None

    def cell(row: dict, key: str, spec: str) -> str:
        if key == "paired":
            return format_interval(row["paired"], spec=spec)
        if key == "excludes_zero":
            excludes = (row["paired"] or {}).get("excludes_zero")
            return "-" if excludes is None else ("yes" if excludes else "no")
        if row.get(key) is None:
            never = key == "to_recover" and row.get("arm") != "baseline" and row.get("level") is not None
            return "never" if never else "-"
        if grouped:
            return format_spread(row[key], row[f"{key}_std"], row[f"{key}_n"], spec)
        return format(row[key], spec)

    columns = [
        ("kept", "kept", ".1%"),
        ("kl_mean", "KL", ".1e"),
        ("value_err", "value err", ".1e"),
        ("last_mean", f"last {summary['last']} mean", ".4g"),
        ("difference", "vs baseline", "+.4g"),
        ("difference_pct", "%", "+.1%"),
        ("auc", "AUC", ".4g"),
        ("to_recover", f"to recover ({x_unit})", f",.{decimals}f"),
    ]
    if grouped:  # the difference seed by seed, with its interval
        at = columns.index(("difference", "vs baseline", "+.4g"))
        columns[at : at + 1] = [("paired", "vs baseline [95% CI]", "+.4g"), ("excludes_zero", "excludes 0", "")]
    if not has_baseline:
        hidden = ("difference", "difference_pct", "to_recover", "paired", "excludes_zero")
        columns = [column for column in columns if column[0] not in hidden]
    first = ("arm", "runs") if grouped else ("run", "arm")
    table = [(*first, *(title for _, title, _ in columns))]
    for row in summary["arms"] if grouped else summary["runs"]:
        lead = (row["arm"], str(len(row["runs"]))) if grouped else (row["run"], row["arm"])
        table.append((*lead, *(cell(row, key, spec) for key, _, spec in columns)))
    lines = [f"{summary['y']} vs {summary['x']}, every measure from the cut"]
    if summary["collapse_x"] is not None:
        lines.append(
            f"cut at {summary['collapse_x']:,.{decimals}f}; AUC over {summary['auc_span'][0]:,.{decimals}f}-"
            f"{summary['auc_span'][1]:,.{decimals}f}, the span every run covers; kept, KL (mean, of the action "
            "distribution) and value error (max|dv|/max|v|) from each collapse's record"
        )
    if summary["baseline_before_collapse"] is not None:
        lines.append(
            f"baseline {summary['baseline']}, mean over the {summary['last']} epochs up to the cut: "
            f"{summary['baseline_before_collapse']:.4g} (the level 'to recover' counts to; each run's is its seed's "
            "baseline's)"
        )
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join([*lines, format_table(table), *statistics_lines(summary)])


def statistics_lines(summary: dict) -> list[str]:
    """What the grouped table's spreads and intervals are, the paired differences between arms, and rliable's."""
    if "arms" not in summary:
        return []
    measure = f"last {summary['last']} mean"
    lines = ["± standard deviation over the n runs that have the measure; n = 1 has no spread"]
    if summary["baseline"] is not None:
        lines.append(
            f"vs baseline: the arm's {measure} minus its seed's baseline's, over the n seeds both have, 95% bootstrap "
            "interval over seeds"
        )
    if summary["paired_between_arms"]:
        lines.append(f"paired differences of the {measure} between arms (a - b, seed by seed, 95% bootstrap CI):")
        for pair in summary["paired_between_arms"]:
            excludes = {None: "", True: ", excludes 0", False: ", includes 0"}[pair["excludes_zero"]]
            lines.append(f"  {pair['a']} - {pair['b']}: {format_interval(pair, spec='+.4g')}{excludes}")
    if summary["rliable"] is not None:
        iqm = summary["rliable"]["iqm"]
        text = "; ".join(f"{label} {format_interval(value, 'iqm')}" for label, value in iqm.items())
        lines.append(f"interquartile mean of the {measure} over runs (rliable, 95% CI): {text}")
        improvement = summary["rliable"]["probability_of_improvement"]
        if improvement:
            text = "; ".join(f"{pair['x']} {format_interval(pair, 'probability', '.2f')}" for pair in improvement)
            lines.append(f"probability that a run of the arm beats one of the baseline (rliable, 95% CI): {text}")
    return lines


def plot_compare(curves: list[Curve], summary: dict, window: int = 1) -> Figure:
    """The learning curves (smoothed, raw ones faint behind; with arms, their mean and spread), one line at the cut.
    A branch is drawn from the cut on: before it, its history is its source's."""
    figure = Figure(figsize=(10, 5.5), layout="constrained")
    axes = figure.subplots()
    rows = {row["run"]: row for row in summary["runs"]}
    cut = summary["collapse_x"]

    def shown(curve: Curve) -> np.ndarray:
        branched = rows[curve.name]["mode"] is not None and cut is not None
        return curve.x >= cut if branched else np.ones(len(curve.x), dtype=bool)

    if "arms" in summary:
        for index, group in enumerate(summary["arms"]):
            members = [curve for curve in curves if curve.name in group["runs"]]
            xs = np.unique(np.concatenate([curve.x[shown(curve)] for curve in members]))
            ys = np.array([np.interp(xs, curve.x, curve.smoothed, left=np.nan, right=np.nan) for curve in members])
            label = f"{group['arm']} ({len(members)} run{'s' if len(members) > 1 else ''})"
            axes.plot(xs, np.nanmean(ys, axis=0), color=f"C{index}", linewidth=1.8, label=label)
            axes.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=f"C{index}", alpha=0.15)
    else:
        labels = [rows[curve.name]["arm"] for curve in curves]
        for index, curve in enumerate(curves):
            mask, color = shown(curve), f"C{index}"
            if window > 1:
                axes.plot(curve.x[mask], curve.y[mask], color=color, alpha=0.25, linewidth=0.8)
            repeated = labels.count(labels[index]) > 1
            label = f"{labels[index]}: {curve.name}" if repeated else labels[index]
            axes.plot(curve.x[mask], curve.smoothed[mask], color=color, linewidth=1.8, label=label)
    if cut is not None:
        axes.axvline(cut, color="black", linestyle="--", linewidth=1, label="the cut (collapse)")
    if summary["baseline_before_collapse"] is not None:
        axes.axhline(summary["baseline_before_collapse"], color="gray", linestyle=":", label="baseline before the cut")
    axes.set_xlabel(X_LABELS[summary["x"]])
    axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 250k, 1M: plain tick labels run into each other
    axes.set_ylabel(summary["y"] if window == 1 else f"{summary['y']} (moving average of {window})")
    # below the axes: run names can be long, and a legend beside the axes would take their width
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2)
    axes.grid(alpha=0.3)
    return figure
