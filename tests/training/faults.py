"""Run a `tools/run.py` job that SIGKILLs itself at a named point: `python faults.py POINT EPOCH RUN_ARGS...`.

The points are where a killed job could leave a run half-written. EPOCH picks the occurrence for the points tied
to an epoch (a checkpoint or a metrics line of that epoch); the others fire at their first occurrence."""

import io
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from metta_collapse.training import checkpoint, collapse, metrics, trainer  # noqa: E402
from metta_collapse.training.runner import main  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_saved(epoch: int, at_final_name: bool):
    """torch.save that writes half of a checkpoint of `epoch` (to its temporary file, or, as a file system
    without atomic renames would, to its final name) and dies."""
    save = torch.save

    def patched(payload, path, *args, **kwargs):
        path = Path(path)
        if f"__e{epoch}__" not in path.name or ".precollapse" in path.name:
            return save(payload, path, *args, **kwargs)
        buffer = io.BytesIO()
        save(payload, buffer)
        target = path.with_name(path.name.removesuffix(".tmp")) if at_final_name else path
        target.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        die()

    return patched


def torn_metrics_line(epoch: int):
    log = metrics.MetricsLogger.log

    def patched(self, values: dict) -> None:
        if values["metric/epoch"] != epoch:
            return log(self, values)
        with self.path.open("a") as f:
            f.write('{"metric/epoch": ' + str(epoch) + ', "metric/ag')
        die()

    return patched


def dies_before(function, when=lambda *args, **kwargs: True):
    def patched(*args, **kwargs):
        if when(*args, **kwargs):
            die()
        return function(*args, **kwargs)

    return patched


POINTS = {
    # mid checkpoint write: half the file in `<name>.tmp`
    "checkpoint_write": lambda e: setattr(torch, "save", half_saved(e, at_final_name=False)),
    # a torn checkpoint under its final name (no atomic rename): unreadable latest checkpoint
    "torn_checkpoint": lambda e: setattr(torch, "save", half_saved(e, at_final_name=True)),
    # half a line of metrics.jsonl
    "metrics_line": lambda e: setattr(metrics.MetricsLogger, "log", torn_metrics_line(e)),
    # live: after the pre-collapse checkpoint, before the collapse; branch: before its first checkpoint
    "before_collapse": lambda e: setattr(
        collapse.CollapseTrainTool, "collapse_policy", dies_before(collapse.CollapseTrainTool.collapse_policy)
    ),
    # live: collapsed in memory, before collapse.json; branch: after its first checkpoint, before collapse.json
    "before_record": lambda e: setattr(
        collapse, "write_json", dies_before(collapse.write_json, lambda path, _: path.name == "collapse.json")
    ),
    # live: after collapse.json, before the checkpoint that holds the collapse
    "before_collapsed_checkpoint": lambda e: setattr(
        trainer,
        "save_checkpoint",
        dies_before(trainer.save_checkpoint, lambda *args, **kwargs: "collapse" in kwargs["extra"]),
    ),
}

if __name__ == "__main__":
    point, epoch, *argv = sys.argv[1:]
    POINTS[point](int(epoch))
    assert checkpoint.torch is torch  # the checkpoint module saves through the patched torch.save
    sys.exit(main(argv))
