"""The embedded runtime under torchrun: two CPU processes (gloo) train one run, collapse it together and stay
identical; a failure on one rank is undone on both; the run resumes on any number of processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training_run import TINY

from metta_collapse.training.checkpoint import checkpoint_epochs, load_checkpoint
from metta_collapse.training.config import ConfigError
from metta_collapse.training.metrics import read_metrics
from metta_collapse.training.policy import DEFAULT_WIDTHS
from metta_collapse.training.runner import build_tool

RANKS = Path(__file__).with_name("ranks.py")
RECIPE = "experiments.recipes.collapse_arena.train"


def run(tmp_path: Path, processes: int, epochs: int, *extra: str, **env: str) -> list[dict]:
    """Train run `ddp` to `epochs` tiny epochs (384 agent steps each) in `processes` processes; the replicas'
    digests after every epoch."""
    digests = tmp_path / f"digests_{processes}_{epochs}.jsonl"
    settings = [f"{key}={value}" for key, value in TINY.items()] + [
        "run=ddp",
        f"train_dir={tmp_path}",
        "wandb.enabled=false",
        f"trainer.total_timesteps={epochs * 384}",
        "trainer.checkpoint.checkpoint_interval=1",
        "trainer.checkpoint.wandb_checkpoint_interval=0",
        "collapse.epoch_idx=2",
        "collapse.fit_steps=1024",
        *extra,
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(
        [*launch, str(RANKS), RECIPE, *settings],
        env={**os.environ, "DIGESTS": str(digests), **env},
        capture_output=True,
        text=True,
        timeout=300,  # a rank left waiting on the other would hang here
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in digests.read_text().splitlines()]


def test_two_processes_collapse_once_stay_identical_and_resume_on_one_or_two(tmp_path: Path):
    digests = run(tmp_path, 2, 3)
    assert [d["epoch"] for d in digests] == [1, 2, 3]
    assert all(len(set(d["digests"])) == 1 for d in digests)  # after every epoch, the collapse's included
    run_dir = tmp_path / "ddp"
    record = json.loads((run_dir / "collapse.json").read_text())
    assert record["epoch"] == 2 and record["params_after"] < record["params_before"]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [(m["metric/epoch"], m["metric/agent_step"]) for m in metrics] == [(1, 384), (2, 768), (3, 1152)]
    assert sorted(checkpoint_epochs(run_dir / "checkpoints", "ddp")) == [1, 2, 3]
    assert not (run_dir / "run.lock").exists() and not (run_dir / "collapse_failed.json").exists()

    run(tmp_path, 1, 4)
    assert all(len(set(d["digests"])) == 1 for d in run(tmp_path, 2, 5))
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["metric/agent_step"] for m in metrics] == [384 * e for e in range(1, 6)]
    assert sum("collapse/params_after" in m for m in metrics) == 1
    assert json.loads((run_dir / "collapse.json").read_text()) == record


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nccl's process group")
def test_one_process_on_cuda_joins_an_nccl_group_and_collapses_once(tmp_path: Path):
    assert [d["epoch"] for d in run(tmp_path, 1, 3, "device=cuda")] == [1, 2, 3]
    assert json.loads((tmp_path / "ddp" / "collapse.json").read_text())["epoch"] == 2


def test_a_collapse_that_fails_on_one_rank_is_undone_on_both(tmp_path: Path):
    digests = run(tmp_path, 2, 3, FAIL_RANK="1")
    assert all(len(set(d["digests"])) == 1 for d in digests)
    run_dir = tmp_path / "ddp"
    assert not (run_dir / "collapse.json").exists()
    failure = json.loads((run_dir / "collapse_failed.json").read_text())
    assert failure["epoch"] == 2 and failure["error"] == "rank 1: RuntimeError: injected"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m.get("collapse/failed") for m in metrics] == [None, 1.0, None]
    last = load_checkpoint(checkpoint_epochs(run_dir / "checkpoints", "ddp")[3])
    assert last["architecture"]["widths"] == DEFAULT_WIDTHS and "collapse_failed" in last["extra"]


def test_a_batch_that_does_not_split_across_the_processes_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # 480 = 16 steps x 6 agents x 5 segments: one process trains it, two cannot split it into whole segments
    argv = [RECIPE, f"train_dir={tmp_path}", "run=split", "trainer.batch_size=480", "trainer.minibatch_size=96"]
    argv += [
        f"{key}={value}" for key, value in TINY.items() if key not in ("trainer.batch_size", "trainer.minibatch_size")
    ]
    build_tool(argv).start_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"trainer.batch_size=480 .* = 16 x 6 x 2 processes \(WORLD_SIZE\) = 192"):
        build_tool(argv).start_processes()
    assert not (tmp_path / "split").exists()
