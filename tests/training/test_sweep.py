"""The embedded sweep: one baseline, trials that branch from it inside its agent steps, the score and frontier."""

import csv
import json
from pathlib import Path

import pytest
from test_training_run import TINY

from metta_collapse.training.checkpoint import checkpoint_epochs
from metta_collapse.training.config import ConfigError
from metta_collapse.training.runner import build_tool

EPOCHS = 4


def sweep_tool(tmp_path: Path, *extra: str):
    return build_tool(
        [
            "experiments.recipes.collapse_arena.sweep",
            "name=s",
            "trials=2",
            "objective_epochs=1",
            f"trial.train_dir={tmp_path}",
            "trial.wandb.enabled=false",
            *[f"trial.{key}={value}" for key, value in TINY.items()],
            "trial.trainer.checkpoint.checkpoint_interval=1",
            "trial.trainer.checkpoint.wandb_checkpoint_interval=0",
            f"trial.trainer.total_timesteps={EPOCHS * 384}",
            "trial.collapse.fit_steps=1024",
            *extra,
        ]
    )


@pytest.mark.parametrize("size", ["params", "macs"])
def test_trials_branch_from_one_baseline_collapse_inside_their_steps_and_the_frontier_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture, size: str
):
    sweep_tool(tmp_path, "trial.collapse.refit=false", f"size={size}").invoke()  # refit off: a short test
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["trials"]
    assert len(rows) == 2 and len(checkpoint_epochs(tmp_path / "s.baseline" / "checkpoints", "s.baseline")) == EPOCHS
    for row in rows:
        record = json.loads((tmp_path / row["run"] / "collapse.json").read_text())
        assert record["source"] == "s.baseline" and 1 <= record["source_epoch"] < EPOCHS
        assert row["collapse.epoch_idx"] == int(row["collapse.epoch_fraction"] * EPOCHS)
        count = "params" if size == "params" else "macs_per_step"
        assert row["kept"] == record[f"{count}_after"] / record[f"{count}_before"] <= row[f"collapse.budget.{size}"]
        assert record["budget"][size] == row[f"collapse.budget.{size}"]
        assert (row["kl_mean"], row["value_err"]) == (record["kl_mean"], record["value_err"])
        assert row["score"] == pytest.approx(row["reward"] / row["baseline_reward"] - 0.5 * row["kept"])
    with (tmp_path / "s" / "results.csv").open() as table:
        assert {"kept", "kl_mean", "value_err", "recovered", "score"} <= set(next(csv.reader(table)))
    out = capsys.readouterr().out
    assert "Predicted" not in out and "recovered" in out.split("results.json")[-1]
    marked = {int(line.split()[0]) for line in out.splitlines() if line.endswith(" *")}
    assert marked == {row["trial"] for row in rows if not dominated(row, rows)}


def dominated(row: dict, rows: list[dict]) -> bool:
    return any(o["kept"] <= row["kept"] and o["recovered"] > row["recovered"] for o in rows) or any(
        o["kept"] < row["kept"] and o["recovered"] >= row["recovered"] for o in rows
    )


def test_the_frontier_marks_exactly_the_trials_no_other_beats_on_size_and_reward():
    from metta_collapse.training.sweep import frontier

    kept_recovered = [(0.2, 0.9), (0.3, 0.8), (0.3, 0.95), (0.5, 0.95), (0.1, 0.5), (0.2, 0.9)]
    rows = [
        {"trial": i, "collapse.epoch_idx": 1, "collapse.budget.params": k, "kept": k, "recovered": r, "score": 0.0}
        for i, (k, r) in enumerate(kept_recovered)
    ]
    marked = {int(line.split()[0]) for line in frontier(rows).splitlines()[1:] if line.endswith(" *")}
    assert marked == {row["trial"] for row in rows if not dominated(row, rows)} == {0, 2, 4, 5}


def test_a_trial_setting_that_cannot_run_fails_before_the_baseline_trains(tmp_path: Path):
    with pytest.raises(ConfigError, match="set twice"):
        sweep_tool(tmp_path, "trial.collapse.rank_tol.lstm=0.1").invoke()
    assert not (tmp_path / "s.baseline").exists()


def test_the_epoch_fraction_lands_on_a_checkpoint_inside_the_run():
    from metta_collapse.config import epoch_at_fraction

    for epochs in (4, 12, 300):
        for interval in (1, 2, 10):
            for fraction in (0.05, 0.2, 0.4999999999999999, 0.8, 0.95):
                epoch = epoch_at_fraction(fraction, epochs, interval)
                assert epoch % interval == 0 and interval <= epoch <= max(interval, round(fraction * epochs))
    assert epoch_at_fraction(0.4999999999999999, 12) == 6  # as Protein suggests the centre 0.5
