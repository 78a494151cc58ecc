"""A run SIGKILLed at named points (faults.py) and resumed after each kill ends as if it had not been killed:
every epoch once in metrics.jsonl, one collapse, its record's widths in every later checkpoint and in
collapse.json — and, for kills after the collapse, the uninterrupted run's collapse."""

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_training_run import REPO, TINY

from metta_collapse.training.checkpoint import checkpoint_epochs, load_checkpoint
from metta_collapse.training.metrics import TIMING_FIELDS, read_metrics
from metta_collapse.training.policy import DEFAULT_WIDTHS

FAULTS = Path(__file__).with_name("faults.py")
EPOCHS, COLLAPSE_EPOCH = 5, 3


def command(tmp_path: Path, run: str, epochs: int, *extra: str) -> list[str]:
    return [
        "experiments.recipes.collapse_arena.train",
        f"run={run}",
        f"train_dir={tmp_path}",
        "wandb.enabled=false",
        *[f"{key}={value}" for key, value in TINY.items()],
        "trainer.checkpoint.checkpoint_interval=1",
        "trainer.checkpoint.wandb_checkpoint_interval=0",
        f"trainer.total_timesteps={epochs * 384}",
        "collapse.fit_steps=1024",
        "seed=5",
        *extra,
    ]


def attempts(argv: list[str], kills: list[tuple[str, int]]) -> None:
    """Run the job once per kill point, each time resuming what the one before left, then once to the end."""
    for point, epoch in [*kills, (None, 0)]:
        prefix = [str(FAULTS), point, str(epoch)] if point else [str(REPO / "tools" / "run.py")]
        result = subprocess.run([sys.executable, *prefix, *argv], capture_output=True, text=True, timeout=300)
        expected = -signal.SIGKILL if point else 0
        assert result.returncode == expected, f"{point}@{epoch}: exit {result.returncode}\n{result.stderr[-3000:]}"


def collapsed_widths(record: dict) -> dict[str, int]:
    return {layer["name"]: layer["width_after"] for layer in record["layers"] if layer["name"] in DEFAULT_WIDTHS}


def check_run(run_dir: Path, epochs: int, collapse_epoch: int) -> dict:
    """The run's invariants; returns its collapse record."""
    assert [m["metric/epoch"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, epochs + 1))
    collapsed = [m for m in read_metrics(run_dir / "metrics.jsonl") if "collapse/params_after" in m]
    assert len(collapsed) == 1, "one collapse"
    record = json.loads((run_dir / "collapse.json").read_text())
    checkpoints = checkpoint_epochs(run_dir / "checkpoints", run_dir.name)
    assert sorted(checkpoints)[-1] == epochs
    for epoch, path in checkpoints.items():
        checkpoint = load_checkpoint(path)
        widths = checkpoint["architecture"]["widths"]
        if epoch >= collapse_epoch:
            assert checkpoint["extra"]["collapse"] == record
            assert {name: widths[name] for name in collapsed_widths(record)} == collapsed_widths(record)
        else:
            assert "collapse" not in checkpoint["extra"] and widths == dict(DEFAULT_WIDTHS)
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "run.lock").exists()
    return record


def without_timing(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMING_FIELDS}


def test_a_run_killed_at_every_point_and_resumed_ends_as_one_run(tmp_path: Path):
    live = command(tmp_path, "live", EPOCHS, f"collapse.epoch_idx={COLLAPSE_EPOCH}")
    before_the_collapse = [
        ("checkpoint_write", 1),
        ("torn_checkpoint", 2),
        ("metrics_line", 2),
        ("before_collapse", 0),
        ("before_record", 0),
        ("before_collapsed_checkpoint", 0),
    ]
    after_the_collapse = [("torn_checkpoint", 4), ("checkpoint_write", 5), ("metrics_line", 5)]

    def reference_then_later_kills_then_branch() -> None:
        attempts(command(tmp_path, "reference", EPOCHS, f"collapse.epoch_idx={COLLAPSE_EPOCH}"), [])
        attempts(command(tmp_path, "late", EPOCHS, f"collapse.epoch_idx={COLLAPSE_EPOCH}"), after_the_collapse)
        branch = command(tmp_path, "branch", 4, "collapse.init_from=reference", "collapse.epoch_idx=2")
        # killed in its collapse; its only checkpoint torn; before its collapse.json; its first epoch's checkpoint
        kills = [("before_collapse", 0), ("torn_checkpoint", 2), ("before_record", 0), ("checkpoint_write", 3)]
        attempts(branch, kills)

    with ThreadPoolExecutor(2) as pool:  # two independent chains of jobs, one per core
        chains = [pool.submit(attempts, live, before_the_collapse), pool.submit(reference_then_later_kills_then_branch)]
        for chain in chains:
            chain.result()

    check_run(tmp_path / "live", EPOCHS, COLLAPSE_EPOCH)
    assert list((tmp_path / "live" / "checkpoints").glob("live__e2__*.pt.corrupt"))  # set aside, never deleted
    reference = check_run(tmp_path / "reference", EPOCHS, COLLAPSE_EPOCH)
    late = check_run(tmp_path / "late", EPOCHS, COLLAPSE_EPOCH)
    assert without_timing(late) == without_timing(reference)  # kills after the collapse leave it as it was made
    branch = check_run(tmp_path / "branch", 4, 2)
    assert branch["source"] == "reference" and branch["source_epoch"] == 2
