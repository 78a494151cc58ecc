"""The frontier of a checkpoint: how much a collapse changes the policy's behaviour at each size, for each choice
of units, plain and refitted, against random units + refit at the same widths. The picture to choose a budget
from: every figure is measured on whole episodes, from zero state, on maps neither the fit nor the select part
saw."""

import hashlib
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import metta_collapse as mc
from metta_collapse.live import Data
from metta_collapse.training.checkpoint import load_checkpoint, policy_from_checkpoint
from metta_collapse.training.collapse import collapse_copy, policy_data
from metta_collapse.training.config import ConfigError, TrainingEnvConfig
from metta_collapse.training.policy import FastPolicy
from metta_collapse.training.rollout import rollouts

BUDGETS = (0.9, 0.6, 0.45, 0.3, 0.2, 0.15)
UNITS = ("basis", "cosine", "scale_aware")


def frontier_data(
    policy: FastPolicy, arena: str, fit_steps: int, select_copies: int, report_copies: int, horizon: int, seed: int = 0
) -> tuple[Data, dict]:
    """Fit and select: whole episodes cut into `horizon`-step segments from zero state (as the trainer's
    experience is); report: whole episodes from zero state. Each part plays its own held-out maps (its stream of
    `arena.MAP_STREAMS`, drawn from `seed`): one map per environment copy, none met in training or another part."""
    env_cfg = TrainingEnvConfig(arena=arena).make_config()
    steps, agents = env_cfg.game.max_steps, env_cfg.game.num_agents
    horizon = math.gcd(horizon, steps)
    fit_copies = math.ceil(fit_steps / (steps * agents))
    parts = {
        name: rollouts(policy, env_cfg, copies, steps, seed, name)[0]
        for name, copies in (("fit", fit_copies), ("select", select_copies), ("report", report_copies))
    }
    fit, select = (parts[name].reshape(-1, horizon, *parts[name].shape[2:]) for name in ("fit", "select"))
    report = parts["report"]
    sizes = {name: int(np.prod(part.shape[:2])) for name, part in parts.items()}
    description = f"{report_copies} held-out maps x {agents} agents, whole {steps}-step episodes from zero state"
    data = policy_data(policy, fit, select, report, description)
    maps = {"fit": fit_copies, "select": select_copies, "report": report_copies}
    return data, {"agent_steps": sizes, "maps": maps, "episode_steps": steps, "segment_steps": horizon, "seed": seed}


def row(record: dict, units: str, budget: float | None, seed: int | None = None) -> dict:
    return {
        "units": units,
        "refit": record["refit"],
        "budget": budget,
        "seed": seed,
        "kept": record["params_after"] / record["params_before"],
        "macs_kept": record["macs_per_step_after"] / record["macs_per_step_before"],
        **{key: record[key] for key in ("kl_mean", "kl_max", "value_err", "top1", "seconds")},
        "widths": {layer["name"]: layer["width_after"] for layer in record["layers"]},
    }


def frontier(
    checkpoint_path: Path,
    arena: str | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    units: tuple[str, ...] = UNITS,
    random_seeds: int = 3,
    fit_steps: int = 6144,
    select_copies: int = 2,
    report_copies: int = 4,
    horizon: int = 64,
    progress=print,
    size: mc.config.Size = "params",
) -> dict:
    """`size`: what the budgets keep a fraction of, the parameters or the multiply-adds per agent step."""
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"cannot read checkpoint {checkpoint_path}: {type(error).__name__}: {error}") from None
    arena = arena or checkpoint.get("arena")
    if arena is None:
        raise ConfigError(f"{checkpoint_path.name} does not record its arena: name it with --arena small|full")
    policy = policy_from_checkpoint(checkpoint).eval()
    data, sizes = frontier_data(policy, arena, fit_steps, select_copies, report_copies, horizon)
    progress(f"rollouts: {sizes['agent_steps']} agent steps (fit, select, report)")
    study, default = mc.CollapseConfig(metric="cosine"), mc.CollapseConfig(metric="basis")
    rows = [
        row(collapse_copy(policy, data, study, refit), "cosine (study's thresholds)", None) for refit in (False, True)
    ]
    rows.append(row(collapse_copy(policy, data, default, True), "basis (default rank_tol)", None))
    for budget in budgets:
        for name in units:
            # the recipe's budget search, once; the plain arm and random units reuse the knob it chose
            budget_ = mc.Budget(**{size: budget})
            refitted = collapse_copy(policy, data, mc.CollapseConfig(metric=name), True, budget_)
            knob = "rank_tol" if name == "basis" else "thresholds"
            config = mc.CollapseConfig(metric=name, **{knob: refitted[knob]})
            rows += [row(refitted, name, budget), row(collapse_copy(policy, data, config, False), name, budget)]
            if name == "basis":
                for seed in range(random_seeds):
                    record = collapse_copy(policy, data, config, True, mode="random_ablation", seed=seed)
                    rows.append(row(record, "random units (basis widths)", budget, seed))
        progress(f"budget.{size}={budget}: done")
    return {
        "checkpoint": str(checkpoint_path),
        "sha256": hashlib.sha256(checkpoint_path.read_bytes()).hexdigest(),
        "run": checkpoint.get("run"),
        "epoch": checkpoint.get("epoch"),
        "arena": arena,
        "size": size,
        "data": sizes,
        "report": data.description,
        "rows": rows,
    }


def frontier_table(result: dict) -> str:
    from metta_collapse.training.report import format_table

    rows = [
        (
            "budget",
            "units",
            "refit",
            "seed",
            "params kept",
            "MACs kept",
            "KL mean",
            "KL max",
            "value err",
            "top-1",
            "seconds",
        )
    ]
    for r in result["rows"]:
        rows.append(
            (
                "-" if r["budget"] is None else f"{r['budget']:g}",
                r["units"],
                "yes" if r["refit"] else "no",
                "" if r["seed"] is None else str(r["seed"]),
                f"{r['kept']:.1%}",
                f"{r['macs_kept']:.1%}",
                f"{r['kl_mean']:.2e}",
                f"{r['kl_max']:.2e}",
                f"{r['value_err']:.3f}",
                f"{r['top1']:.1%}",
                f"{r['seconds']:.1f}",
            )
        )
    return format_table(rows)


def plot_frontier(result: dict) -> Figure:
    """KL mean and value error against the kept fraction: one line per choice of units, plain dashed."""
    figure = Figure(figsize=(12, 5), layout="constrained")
    kl_axes, value_axes = figure.subplots(1, 2)
    series: dict[tuple[str, bool], list[dict]] = {}
    for r in result["rows"]:
        if r["budget"] is not None:
            series.setdefault((r["units"], r["refit"]), []).append(r)
    for index, ((units, refit), points) in enumerate(sorted(series.items())):
        random = units.startswith("random")
        kept = "macs_kept" if result.get("size") == "macs" else "kept"
        points = sorted(points, key=lambda p: p[kept])
        style = {"linestyle": "none" if random else ("-" if refit else "--"), "marker": "x" if random else "o"}
        label = f"{units}{' + refit' if refit else ', plain'}"
        color = f"C{index}"
        for axes, key in ((kl_axes, "kl_mean"), (value_axes, "value_err")):
            axes.plot([p[kept] for p in points], [p[key] for p in points], color=color, label=label, **style)
    for axes, title in ((kl_axes, "KL(original || collapsed), mean"), (value_axes, "value error max|dv|/max|v|")):
        what = "multiply-adds" if result.get("size") == "macs" else "parameters"
        axes.set_xlabel(f"fraction of {what} kept")
        axes.set_yscale("log")
        axes.set_title(title)
        axes.grid(alpha=0.3, which="both")
    kl_axes.legend(fontsize="small")
    figure.suptitle(f"{Path(result['checkpoint']).name}: held-out behaviour ({result['report']})", fontsize="medium")
    return figure
