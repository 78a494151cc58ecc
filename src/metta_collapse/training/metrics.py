"""Per-epoch metrics: one JSON line per epoch in `<run_dir>/metrics.jsonl`, and the same to wandb."""

import json
import os
import warnings
from pathlib import Path

from metta_collapse.training.config import ConfigError, TrainTool

# an epoch's wall time by PuffeRL's own profile sections: performance/<name>_seconds
TIME_SPLIT = {
    "env": ("env",),  # stepping the environments
    "forward": ("eval_forward",),  # the rollout's policy forward and action sampling
    "update": ("train_forward", "learn"),  # the update's forward, backward and optimizer steps
    "other": ("eval_copy", "eval_misc", "train_copy", "train_misc"),  # copies, advantages, bookkeeping
}


# what measures wall time: the only fields in which two runs of one command with one seed differ on one machine
TIMING_FIELDS = frozenset(
    {
        f"{prefix}{name}"
        for prefix in ("", "collapse/")
        for name in (
            "seconds",
            "seconds_record",
            "seconds_per_step_before",
            "seconds_per_step_after",
            "seconds_eval",
        )
    }
    | {"metric/total_time", "overview/sps", "performance/epoch_seconds"}
    | {f"performance/{part}_seconds" for part in TIME_SPLIT}
)


class MetricsLogger:
    def __init__(self, tool: TrainTool, start_epoch: int):
        tool.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = tool.run_dir / "metrics.jsonl"
        if self.path.exists():
            # epochs after the checkpoint a run resumes from were lost with it, and will be trained again
            kept = [m for m in read_metrics(self.path) if m["metric/epoch"] <= start_epoch]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
            os.replace(tmp, self.path)
        self.run = None
        if tool.wandb.enabled:
            import wandb  # here: reading metrics does not need it

            self.run = wandb.init(
                project=tool.wandb.project,
                entity=tool.wandb.entity,
                group=tool.wandb.group,
                tags=tool.wandb.tags,
                name=tool.run,
                id=tool.run,
                resume="allow",
                mode=tool.wandb.mode,
                dir=str(tool.run_dir),
                config=tool.model_dump(mode="json"),
                settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True, silent=True),
            )

    def log(self, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=int(metrics["metric/agent_step"]))

    def log_checkpoint(self, path: Path) -> None:
        if self.run is not None:
            import wandb

            artifact = wandb.Artifact(name=self.run.id, type="model", metadata={"file": path.name})
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(path: Path) -> list[dict]:
    """A run's per-epoch records. A torn last line (a run killed while writing it) is dropped with a warning;
    any other line that is not a record is an error naming the file and the line."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                warnings.warn(f"{path}: line {number} is torn (a run killed while writing it): dropped", stacklevel=2)
                break
            raise ConfigError(f"{path}, line {number}: not a metrics record: {line[:60]!r}") from None
    return records
