"""Is collapsing better than what a user would do instead? Five arms on the small arena, the same seeds for all.

Per seed: the **baseline** (the full `fast` policy, never collapsed) trains `--epochs` epochs; at epoch E =
epochs / 2 it is branched into the **collapse** (the recipe's default units + refit at `budget.params`), the
**study's fibers** (cosine + refit at the same budget), **random units + refit** and **scratch** (the small network
trained from step 0 for the whole budget), the last two at the collapse arm's per-layer widths (its chosen rank
tolerances, on the same data). The baseline after the cut is the continuation to compare with.

Each run is `tools/run.py experiments.recipes.collapse_arena.small` in its own process, `--jobs` at a time, each
as soon as what it branches from exists; a run already finished on disk is skipped and a partial one resumes, so
the benchmark resumes arm by arm. `--smoke`: one seed, 8 epochs (minutes).

Per arm and seed, `validation.json` holds: parameters, final reward (mean `experience/rewards` over the last 10 %
of epochs), the reward over the 5 epochs after the cut, the AUC after the cut (reward integrated over agent steps
from the cut to the end), the agent steps after the cut until the mean of the epochs after it (5 at most) regains
the same seed's baseline mean over the 5 epochs up to the cut (`stats.steps_to_regain`, as `compare`; none for
scratch, which starts from step 0), the run's wall time, and **held-out play**: the policy at the cut and at the end
in one whole episode on each of 16 fixed held-out maps (never met in training; the same maps and action draws for
every arm), hearts and reward per agent with a 95 % bootstrap interval over maps. Across seeds: each arm's paired
difference from the baseline and between arms (per-seed differences; the branches share each seed's pre-cut
history; 95 % bootstrap interval over seeds), and rliable's IQM and probability of improvement. Also the kept
fraction a collapse would have at the baseline's checkpoints (cosine at the study's thresholds, the basis at its
default rank_tol). `validation.png`: seed mean ± std per arm, the cut marked; `compare.*` for seed 0.

Sized for 2.5 hours on 2 cores with 2 jobs: 5 seeds x 124 epochs of 12,288 agent steps (1.52 M per arm).

    python benchmarks/validation.py [--seeds 5] [--epochs 124] [--budget 0.25] [--jobs 2] [--smoke] [--train-only]
        [--out DIR]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # this checkout, even beside an installed copy

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse import CollapseConfig  # noqa: E402
from metta_collapse.cli import main as cli  # noqa: E402
from metta_collapse.training import stats  # noqa: E402
from metta_collapse.training.checkpoint import checkpoint_epochs, load_checkpoint, policy_from_checkpoint  # noqa: E402
from metta_collapse.training.collapse import collapse_copy  # noqa: E402
from metta_collapse.training.config import TrainingEnvConfig  # noqa: E402
from metta_collapse.training.frontier import frontier_data  # noqa: E402
from metta_collapse.training.metrics import read_metrics  # noqa: E402
from metta_collapse.training.rollout import rollouts  # noqa: E402

ARMS = ("baseline", "collapse", "cosine + refit", "random units + refit", "scratch")
AFTER = 5  # epochs after the cut (and before it, for the level to regain)
EVAL_MAPS, EVAL_SEED = 16, 0  # held-out play: one whole episode on each of these maps


def arm_overrides(arm: str, seed: int, cut: int, budget: float, widths_of: dict | None) -> dict[str, str]:
    """The recipe's overrides of an arm; `widths_of`: the collapse arm's record (random units and scratch)."""
    if arm == "baseline":
        return {"collapse.enabled": "false"}
    branch = {"collapse.init_from": f"s{seed}_baseline", "collapse.epoch_idx": str(cut), "collapse.seed": str(seed)}
    if arm == "collapse":
        return branch | {"collapse.budget.params": str(budget)}
    if arm == "cosine + refit":
        return branch | {"collapse.metric": "cosine", "collapse.budget.params": str(budget)}
    mode = "random_ablation" if arm == "random units + refit" else "scratch"
    knob = {f"collapse.rank_tol.{kind}": repr(value) for kind, value in widths_of["rank_tol"].items()}
    return branch | knob | {"collapse.mode": mode}


def run_name(seed: int, arm: str) -> str:
    return f"s{seed}_{arm.split()[0]}"


def finished(train_dir: Path, name: str, total: int) -> bool:
    path = train_dir / name / "metrics.jsonl"
    return path.exists() and any(m["metric/agent_step"] >= total for m in read_metrics(path))


def schedule(args: argparse.Namespace, train_dir: Path, total: int, cut: int) -> dict[str, float]:
    """Run every (seed, arm) as a process, `args.jobs` at a time, each once its source exists; their wall times."""
    pending = [(seed, arm) for seed in range(args.seeds) for arm in ARMS]
    running: dict[tuple, tuple[subprocess.Popen, float]] = {}
    walls: dict[str, float] = {}
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def ready(seed: int, arm: str) -> dict | None:
        if arm == "baseline":
            return {}
        baseline = run_name(seed, "baseline")
        if cut not in checkpoint_epochs(train_dir / baseline / "checkpoints", baseline):
            return None
        if arm in ("random units + refit", "scratch"):
            record = train_dir / run_name(seed, "collapse") / "collapse.json"
            return json.loads(record.read_text()) if record.exists() else None
        return {}

    while pending or running:
        for key, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[key]
                walls[run_name(*key)] = time.time() - started
                if process.returncode != 0:
                    raise SystemExit(f"{run_name(*key)} failed (exit {process.returncode}): see {logs}")
                print(f"{run_name(*key)} done in {walls[run_name(*key)]:.0f}s", flush=True)
        for seed, arm in list(pending):
            if len(running) >= args.jobs:
                break
            if finished(train_dir, run_name(seed, arm), total):
                pending.remove((seed, arm))
                continue
            source = ready(seed, arm)
            if source is None:
                continue
            pending.remove((seed, arm))
            overrides = {
                "run": run_name(seed, arm),
                "train_dir": str(train_dir),
                "seed": str(seed),
                "trainer.total_timesteps": str(total),
                "trainer.checkpoint.checkpoint_interval": str(cut // 2),
                "trainer.checkpoint.wandb_checkpoint_interval": "0",
                "wandb.enabled": "false",
                **arm_overrides(arm, seed, cut, args.budget, source),
            }
            command = [sys.executable, "tools/run.py", "experiments.recipes.collapse_arena.small"]
            command += [f"{key}={value}" for key, value in overrides.items()]
            log = (logs / f"{run_name(seed, arm)}.log").open("a")
            running[(seed, arm)] = (
                subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                time.time(),
            )
        time.sleep(2)
    return walls


def measures(metrics: list[dict], cut_step: int, level: float | None, tail: int, scratch: bool) -> dict:
    steps = [m["metric/agent_step"] for m in metrics]
    rewards = [m["experience/rewards"] for m in metrics]
    after = [i for i, step in enumerate(steps) if step > cut_step]
    auc = sum((steps[i] - steps[i - 1]) * (rewards[i] + rewards[i - 1]) / 2 for i in after if i > 0)
    return {
        "final_reward": statistics.fmean(rewards[-tail:]),
        "reward_after_cut": statistics.fmean(rewards[i] for i in after[:AFTER]),
        "auc_after_cut": auc,
        # scratch trains from step 0, so its steps after the cut are not a recovery from it: dropped
        "steps_to_regain": None if scratch else stats.steps_to_regain(steps, rewards, cut_step, level, AFTER),
        "agent_steps": steps[-1],
    }


def held_out_play(path: Path) -> dict:
    """The policy of a checkpoint in whole episodes on EVAL_MAPS fixed held-out maps (the same for every arm and
    seed, never met in training), actions sampled from it with the same random numbers for every policy: hearts
    and reward per agent, with a 95 % bootstrap interval over maps (the agents of one map play together). Kept
    beside the checkpoint, so a rerun measures each checkpoint once."""
    cached = path.with_suffix(".play.json")
    if cached.exists():
        return json.loads(cached.read_text())
    env_cfg = TrainingEnvConfig(arena="small").make_config()
    policy = policy_from_checkpoint(load_checkpoint(path)).eval()
    outcome = rollouts(policy, env_cfg, EVAL_MAPS, env_cfg.game.max_steps, EVAL_SEED, "evaluate")[2]
    result: dict = {"maps": EVAL_MAPS, "agents": len(outcome["hearts"])}
    for key in ("hearts", "reward"):
        per_map = outcome[key].reshape(EVAL_MAPS, -1).double().mean(1).numpy()
        interval = scipy.stats.bootstrap(
            (per_map,), np.mean, confidence_level=0.95, method="percentile", random_state=0
        ).confidence_interval
        result |= {key: float(per_map.mean()), f"{key}_low": float(interval.low), f"{key}_high": float(interval.high)}
    cached.write_text(json.dumps(result))
    return result


def checkpoint_at(train_dir: Path, name: str, epoch: int | None = None) -> Path:
    epochs = checkpoint_epochs(train_dir / name / "checkpoints", name)
    return epochs[max(epochs) if epoch is None else epoch]


def symmetry(train_dir: Path, name: str) -> list[dict]:
    """The kept fraction of a collapse at each of the baseline's checkpoints: cosine at the study's thresholds
    (the plain merge), the basis at its default rank_tol (with the refit), on rollouts of that policy on held-out
    maps. Kept beside each checkpoint, so a rerun measures each once."""
    rows = []
    for epoch, path in sorted(checkpoint_epochs(train_dir / name / "checkpoints", name).items()):
        cached = path.with_suffix(".symmetry.json")
        if cached.exists():
            rows.append(json.loads(cached.read_text()))
            continue
        policy = policy_from_checkpoint(load_checkpoint(path)).eval()
        data, _ = frontier_data(policy, "small", 6144, 2, 1, 64)
        kept = {}
        for metric, refit in (("cosine", False), ("basis", True)):
            record = collapse_copy(policy, data, CollapseConfig(metric=metric), refit)
            kept[metric] = record["params_after"] / record["params_before"]
        rows.append({"epoch": epoch, "kept_cosine": kept["cosine"], "kept_basis": kept["basis"]})
        cached.write_text(json.dumps(rows[-1]))
    return rows


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)} if values else None


def plot(results: dict, cut_step: int, path: Path) -> None:
    figure = Figure(figsize=(10, 5.5))
    axes = figure.subplots()
    for arm, entries in results.items():
        curves = [e["curve"] for e in entries]
        length = min(len(c) for c in curves)
        steps = [curves[0][i][0] for i in range(length)]
        start = 0 if arm in ("baseline", "scratch") else next(i for i, s in enumerate(steps) if s > cut_step)
        smooth = [[statistics.fmean(r for _, r in c[max(0, i - 4) : i + 1]) for i in range(length)] for c in curves]
        mean = [statistics.fmean(s[i] for s in smooth) for i in range(length)]
        std = [statistics.pstdev(s[i] for s in smooth) for i in range(length)]
        line = axes.plot(steps[start:], mean[start:], label=f"{arm} ({entries[0]['params']:,} params)")[0]
        low, high = [m - d for m, d in zip(mean, std, strict=True)], [m + d for m, d in zip(mean, std, strict=True)]
        axes.fill_between(steps[start:], low[start:], high[start:], color=line.get_color(), alpha=0.15)
    axes.axvline(cut_step, color="gray", linestyle="--", label="cut (branches start here)")
    axes.set_xlabel("agent steps")
    axes.set_ylabel("experience/rewards (5-epoch mean; band: ± std over seeds)")
    axes.legend(fontsize=8, loc="upper left")
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=124)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one seed, 8 epochs")
    parser.add_argument("--train-only", action="store_true", help="train every run, measure nothing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs = 1, 8
    args.out = args.out or REPO / "benchmarks" / "results" / ("validation_smoke" if args.smoke else "validation")
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir = args.out / "train_dir"
    epoch_steps = collapse_arena.small().trainer.batch_size
    total, cut = args.epochs * epoch_steps, args.epochs // 2
    cut_step, tail = cut * epoch_steps, max(1, args.epochs // 10)
    start = time.time()
    walls = schedule(args, train_dir, total, cut)
    if args.train_only:
        return
    played = [checkpoint_at(train_dir, run_name(seed, arm)) for seed in range(args.seeds) for arm in ARMS]
    played += [checkpoint_at(train_dir, run_name(s, arm), cut) for s in range(args.seeds) for arm in ARMS[:-1]]
    print(f"held-out play of {len(played)} checkpoints, {args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        list(pool.map(held_out_play, played))
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        base = read_metrics(train_dir / run_name(seed, "baseline") / "metrics.jsonl")
        base_steps = [m["metric/agent_step"] for m in base]
        level = stats.level_before_cut(base_steps, [m["experience/rewards"] for m in base], cut_step, AFTER)
        for arm in ARMS:
            name = run_name(seed, arm)
            metrics = read_metrics(train_dir / name / "metrics.jsonl")
            record_path = train_dir / name / "collapse.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else None
            results[arm].append(
                {
                    "seed": seed,
                    "run": name,
                    "params": record["params_after"] if record else policy_params(train_dir / name),
                    "widths": {layer["name"]: layer["width_after"] for layer in record["layers"]} if record else None,
                    "wall_seconds": walls.get(name),
                    **measures(metrics, cut_step, level, tail, arm == "scratch"),
                    # scratch's network at the cut learned nothing yet
                    "play_at_cut": None if arm == "scratch" else held_out_play(checkpoint_at(train_dir, name, cut)),
                    "play_at_end": held_out_play(checkpoint_at(train_dir, name)),
                    "curve": [(m["metric/agent_step"], m["experience/rewards"]) for m in metrics],
                }
            )
    measured = {
        "final_reward": lambda e: e["final_reward"],
        "auc_after_cut": lambda e: e["auc_after_cut"],
        "hearts_at_end": lambda e: e["play_at_end"]["hearts"],
        "reward_at_end": lambda e: e["play_at_end"]["reward"],
        "hearts_at_cut": lambda e: e["play_at_cut"]["hearts"] if e["play_at_cut"] else None,
    }
    per_seed = {
        key: {arm: {e["seed"]: get(e) for e in entries if get(e) is not None} for arm, entries in results.items()}
        for key, get in measured.items()
    }
    pairs = [(arm, "baseline") for arm in ARMS[1:]]
    pairs += [("collapse", "random units + refit"), ("collapse", "scratch"), ("collapse", "cosine + refit")]
    differences = {
        key: {f"{x} - {y}": stats.paired_difference(values[x], values[y]) for x, y in pairs}
        for key, values in per_seed.items()
    }
    rliable = {
        key: stats.rliable_summary({arm: list(v.values()) for arm, v in values.items() if v}, pairs)
        for key, values in per_seed.items()
        if key != "hearts_at_cut"
    }
    fields = ("params", "final_reward", "auc_after_cut", "steps_to_regain")
    summary = {arm: {f: spread([e[f] for e in entries]) for f in fields} for arm, entries in results.items()}
    for arm, row in summary.items():
        row |= {key: spread(list(per_seed[key][arm].values())) for key in measured if key not in fields}
    print(f"\n{args.seeds} seeds x {total:,} agent steps per arm, cut at epoch {cut} ({cut_step:,} steps)")
    print(validation_table(summary, differences, per_seed))
    print("symmetry over training (kept fraction at the baseline's checkpoints):")
    with ProcessPoolExecutor(args.jobs) as pool:
        names = [run_name(seed, "baseline") for seed in range(args.seeds)]
        over_training = dict(enumerate(pool.map(symmetry, [train_dir] * args.seeds, names)))
    for seed, rows in over_training.items():
        kept = [f"e{r['epoch']} cosine {r['kept_cosine']:.1%} basis {r['kept_basis']:.1%}" for r in rows]
        print(f"  seed {seed}: " + ", ".join(kept))
    plot(results, cut_step, args.out / "validation.png")
    cli(["compare", *(run_name(0, arm) for arm in ARMS), "--train-dir", str(train_dir), "--out", str(args.out)])
    payload = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "cut_epoch": cut,
        "epoch_agent_steps": epoch_steps,
        "budget_params": args.budget,
        "jobs": args.jobs,
        "final_reward_epochs": tail,
        "regain_window_epochs": AFTER,
        "held_out_play": {"maps": EVAL_MAPS, "seed": EVAL_SEED, "stream": "evaluate"},
        "wall_seconds": time.time() - start,
        "summary": summary,
        "paired_differences": differences,
        "rliable": rliable,
        "symmetry_over_training": over_training,
        "runs": results,
    }
    (args.out / "validation.json").write_text(json.dumps(payload, indent=1))
    print(f"wall time {time.time() - start:.0f}s; wrote {args.out}/validation.json, validation.png, compare.*")


def validation_table(summary: dict, differences: dict, per_seed: dict) -> str:
    """Per arm: mean ± std over seeds (n), and the paired difference from the baseline with its 95 % interval."""
    lines = []
    for key in ("final_reward", "auc_after_cut", "hearts_at_end", "reward_at_end"):
        lines.append(f"{key}:")
        for arm, row in summary.items():
            s = row[key]
            cell = stats.format_spread(s["mean"], s["std"], s["n"]) if s else "-"
            versus = differences[key].get(f"{arm} - baseline")
            lines.append(f"  {arm:<22} {cell:>28}   vs baseline {stats.format_interval(versus)}")
        for pair in ("collapse - random units + refit", "collapse - scratch"):
            lines.append(f"  {pair:<40} {stats.format_interval(differences[key][pair])}")
    return "\n".join(lines)


def policy_params(run_dir: Path) -> int:
    latest = max(checkpoint_epochs(run_dir / "checkpoints", run_dir.name).items())[1]
    return sum(p.numel() for p in policy_from_checkpoint(load_checkpoint(latest)).parameters())


if __name__ == "__main__":
    main()
