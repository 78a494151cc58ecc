"""Threshold sweeps with PufferLib's Protein (the optimiser Metta's sweeps use), trials run one after another.

Each trial is an ordinary run of the collapse recipe: a copy of `trial` (set by overrides such as
`trial.trainer.total_timesteps=200000`) with the suggested `collapse.*` values; its score is the mean
`experience/rewards` over the last `objective_epochs` epochs after the collapse."""

import csv
import json
import time
from pathlib import Path

import pufferlib
from pydantic import Field

import metta_collapse as mc
from metta_collapse.training.collapse import CollapseTrainTool, write_json
from metta_collapse.training.config import Tool
from metta_collapse.training.metrics import read_metrics

THRESHOLD_DEFAULTS = {"linear": 0.7, "cnn": 0.5, "lstm": 1.0, "critic": 0.8}


class SweepTool(Tool):
    name: str = Field(default="collapse_sweep", pattern=r"^[\w.=+-]+$")
    trials: int = Field(default=8, ge=1)
    objective_epochs: int = Field(default=10, ge=1)
    # also search collapse.epoch_idx in [epoch_idx_min, epoch_idx_max] (epochs of each trial's own run)
    search_epoch_idx: bool = False
    epoch_idx_min: int = Field(default=1, ge=0)
    epoch_idx_max: int = Field(default=20, ge=0)
    seed: int = 0
    trial: CollapseTrainTool = Field(default_factory=CollapseTrainTool)

    def search_space(self) -> dict:
        """The trial's own knob: the thresholds of a weight metric, or the basis's rank tolerances."""
        if self.trial.collapse.metric == "basis":
            log = {"distribution": "log_normal", "min": 1e-3, "max": 0.5, "scale": "auto"}
            space = {"rank_tol": {kind: log | {"mean": mean} for kind, mean in mc.RankTol().model_dump().items()}}
        else:
            uniform = {"distribution": "uniform", "min": 0.0, "max": 2.0, "scale": "auto"}
            space = {"thresholds": {kind: uniform | {"mean": mean} for kind, mean in THRESHOLD_DEFAULTS.items()}}
        if self.search_epoch_idx:
            space["epoch_idx"] = {
                "distribution": "int_uniform",
                "min": self.epoch_idx_min,
                "max": self.epoch_idx_max,
                "mean": (self.epoch_idx_min + self.epoch_idx_max) // 2,
                "scale": "auto",
            }
        return {"method": "Protein", "metric": "reward_after_collapse", "goal": "maximize", "collapse": space}

    def invoke(self) -> int:
        from pufferlib.sweep import Protein

        protein = Protein(self.search_space())
        out = Path(self.trial.train_dir) / self.name
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(self.trials):
            suggestion, _ = protein.suggest(None)
            values = dict(pufferlib.unroll_nested_dict(suggestion))
            tool = self.trial.model_copy(deep=True)
            tool.run = f"{self.name}.trial{index}"
            tool.seed = self.seed
            for path, value in values.items():
                section, *rest = path.split("/")[1:]
                target = getattr(tool.collapse, section) if rest else tool.collapse
                setattr(target, rest[0] if rest else section, round(value, 4) if isinstance(value, float) else value)
            start = time.time()
            tool.invoke()
            score = objective(Path(tool.train_dir) / tool.run, self.objective_epochs)
            cost = time.time() - start
            protein.observe(suggestion, score if score is not None else 0.0, cost, is_failure=score is None)
            rows.append(
                {
                    "trial": index,
                    "run": tool.run,
                    **{
                        f"collapse.{k.split('/', 1)[1].replace('/', '.')}": v
                        for k, v in dict(pufferlib.unroll_nested_dict(suggestion)).items()
                    },
                    "score": score,
                    "seconds": cost,
                }
            )
            write_results(out, rows)
        best = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
        print(f"\nsweep {self.name}: {len(rows)} trials, results in {out}/results.csv and results.json")
        for row in best[:3]:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return 0


def objective(run_dir: Path, epochs: int) -> float | None:
    """Mean experience/rewards over the last `epochs` epochs after the run's collapse; None without one."""
    record = run_dir / "collapse.json"
    if not record.exists():
        return None
    collapse_epoch = json.loads(record.read_text())["epoch"]
    after = [
        m["experience/rewards"] for m in read_metrics(run_dir / "metrics.jsonl") if m["metric/epoch"] > collapse_epoch
    ]
    return sum(after[-epochs:]) / len(after[-epochs:]) if after else None


def write_results(directory: Path, rows: list[dict]) -> None:
    write_json(directory / "results.json", {"trials": rows})
    with (directory / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
