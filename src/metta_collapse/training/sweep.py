"""Size sweeps with PufferLib's Protein (the optimiser Metta's sweeps use), trials one after another.

The sweep trains one baseline run (`<name>.baseline`, the trial's settings, never collapsed). Each trial branches
from it at `collapse.epoch_idx = ⌊epoch_fraction × epochs⌋` (a baseline checkpoint) with a size budget
`collapse.budget.<size>` (`size`: params, the default, or macs), both suggested by Protein, and trains to the same
total. Its score:

    score = reward recovered − size_weight × kept

with `reward recovered` the trial's mean `experience/rewards` over its last `objective_epochs` epochs divided by
the baseline's over the same epochs, and `kept` the collapse's params_after / params_before (or, with
size=macs, its multiply-adds per agent step after / before)."""

import contextlib
import csv
import io
import json
import time
from pathlib import Path

from pydantic import Field

from metta_collapse.config import Size, sweep_space
from metta_collapse.training.collapse import CollapseTrainTool
from metta_collapse.training.config import ConfigError, Tool, write_json
from metta_collapse.training.metrics import read_metrics


class SweepTool(Tool):
    name: str = Field(default="collapse_sweep", pattern=r"^[\w.=+-]+$")
    trials: int = Field(default=8, ge=1)
    objective_epochs: int = Field(default=10, ge=1)
    size_weight: float = Field(default=0.5, ge=0.0, allow_inf_nan=False)
    seed: int = 0
    size: Size = "params"
    trial: CollapseTrainTool = Field(default_factory=CollapseTrainTool)

    def search_space(self) -> dict:
        """Protein's space: `collapse.budget.<size>` and `collapse.epoch_fraction`, logit-normal in (0, 1)."""
        space: dict = {}
        for path, (low, high, centre) in sweep_space(self.size).items():
            *sections, leaf = path.split(".")[1:]
            node = space
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = {"distribution": "logit_normal", "min": low, "max": high, "mean": centre, "scale": "auto"}
        return {"method": "Protein", "metric": "score", "goal": "maximize", "collapse": space}

    def invoke(self) -> int:
        import pufferlib
        from pufferlib.sweep import Protein

        trial = self.trial.model_copy(deep=True)
        trial.seed, trial.collapse.enabled = self.seed, True
        space = sweep_space(self.size)
        setattr(trial.collapse.budget, self.size, space[f"collapse.budget.{self.size}"][2])
        trial.collapse.epoch_fraction = space["collapse.epoch_fraction"][2]
        trial.collapse.init_from = f"{self.name}.baseline"
        trial.collapse.check()  # a trial setting that cannot run fails before the baseline trains
        if trial.trainer.checkpoint.checkpoint_interval == 0:
            raise ConfigError("trial.trainer.checkpoint.checkpoint_interval=0: trials branch from baseline checkpoints")
        baseline = trial.model_copy(deep=True)
        baseline.run, baseline.collapse.enabled, baseline.collapse.init_from = trial.collapse.init_from, False, None
        print(f"sweep {self.name}: baseline run {baseline.run}, then {self.trials} trials branching from it")
        baseline.invoke()
        with contextlib.redirect_stdout(io.StringIO()):  # Protein prints its search bounds
            protein = Protein(self.search_space())
        out = Path(trial.train_dir) / self.name
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(self.trials):
            with contextlib.redirect_stdout(io.StringIO()):  # and its predictions
                suggestion, _ = protein.suggest(None)
            values = {path: round(value, 4) for path, value in pufferlib.unroll_nested_dict(suggestion)}
            tool = trial.model_copy(deep=True)
            tool.run = f"{self.name}.trial{index}"
            setattr(tool.collapse.budget, self.size, values[f"collapse/budget/{self.size}"])
            tool.collapse.epoch_fraction = values["collapse/epoch_fraction"]
            start = time.time()
            tool.invoke()
            row = {"trial": index, "run": tool.run}
            row |= outcome(tool, baseline, self.objective_epochs, self.size_weight, self.size)
            row["seconds"] = time.time() - start
            protein.observe(suggestion, row["score"], row["seconds"], is_failure=False)
            rows.append(row)
            write_results(out, rows)
        print(f"\nsweep {self.name}: {len(rows)} trials, results in {out}/results.csv and results.json")
        print(frontier(rows))
        return 0


def outcome(tool: CollapseTrainTool, baseline: Tool, epochs: int, size_weight: float, size: Size = "params") -> dict:
    """A finished trial's settings, size, reward and score (module docstring)."""
    run_dir = Path(tool.train_dir) / tool.run
    record = json.loads((run_dir / "collapse.json").read_text())
    rewards = {m["metric/epoch"]: m["experience/rewards"] for m in read_metrics(run_dir / "metrics.jsonl")}
    base = {m["metric/epoch"]: m["experience/rewards"] for m in read_metrics(baseline.run_dir / "metrics.jsonl")}
    last = [epoch for epoch in sorted(rewards) if epoch > record["epoch"] and epoch in base][-epochs:]
    if not last:
        raise ConfigError(f"{tool.run} trained no epoch after its collapse at epoch {record['epoch']}")
    reward, base_reward = (sum(r[e] for e in last) / len(last) for r in (rewards, base))
    if base_reward <= 0:
        raise ConfigError(
            f"the baseline earned no reward over epochs {last[0]}-{last[-1]}: the score (reward recovered) needs "
            "it; train longer (trial.trainer.total_timesteps)"
        )
    count = "params" if size == "params" else "macs_per_step"
    kept = record[f"{count}_after"] / record[f"{count}_before"]
    return {
        "collapse.epoch_fraction": tool.collapse.epoch_fraction,
        "collapse.epoch_idx": record["source_epoch"],
        f"collapse.budget.{size}": getattr(tool.collapse.budget, size),
        "kept": kept,
        "kl_mean": record["kl_mean"],
        "value_err": record["value_err"],
        "reward": reward,
        "baseline_reward": base_reward,
        "recovered": reward / base_reward,
        "score": reward / base_reward - size_weight * kept,
    }


def frontier(rows: list[dict]) -> str:
    """The trials by the fraction kept; * marks the frontier: no other trial keeps less and recovers more."""
    lines = [f"{'trial':>5} {'epoch':>5} {'budget':>6} {'kept':>6} {'recovered':>9} {'score':>7}"]
    for row in sorted(rows, key=lambda r: r["kept"]):
        budget = next(value for key, value in row.items() if key.startswith("collapse.budget."))
        dominated = any(
            (o["kept"], -o["recovered"]) != (row["kept"], -row["recovered"])
            and o["kept"] <= row["kept"]
            and o["recovered"] >= row["recovered"]
            for o in rows
        )
        lines.append(
            f"{row['trial']:>5} {row['collapse.epoch_idx']:>5} {budget:>6.3f} "
            f"{row['kept']:>6.1%} {row['recovered']:>9.3f} {row['score']:>7.3f}{'' if dominated else ' *'}"
        )
    return "\n".join(lines)


def write_results(directory: Path, rows: list[dict]) -> None:
    write_json(directory / "results.json", {"trials": rows})
    with (directory / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
