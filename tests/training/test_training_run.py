import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from metta_collapse.training.checkpoint import latest_checkpoint, load_checkpoint, policy_from_checkpoint
from metta_collapse.training.config import TrainTool
from metta_collapse.training.metrics import read_metrics
from metta_collapse.training.policy import FastPolicy
from metta_collapse.training.trainer import TrainerState, train

REPO = Path(__file__).resolve().parents[2]
# 6 agents x 16 steps x 4 segments per agent: tiny epochs on the small arena
TINY = {
    "trainer.batch_size": "384",
    "trainer.minibatch_size": "192",
    "trainer.bptt_horizon": "16",
    "training_env.arena": "small",
    "training_env.num_envs": "1",
}


def tiny_tool(tmp_path: Path, run: str, total: int, **overrides: object) -> TrainTool:
    tool = TrainTool(run=run, train_dir=str(tmp_path))
    tool.trainer.batch_size, tool.trainer.minibatch_size, tool.trainer.bptt_horizon = 384, 192, 16
    tool.training_env.arena, tool.training_env.num_envs = "small", 1
    tool.trainer.total_timesteps = total
    tool.trainer.checkpoint.checkpoint_interval = 2
    tool.trainer.checkpoint.wandb_checkpoint_interval = 2
    for key, value in overrides.items():
        setattr(tool.wandb, key, value)
    return tool


def test_smoke_run_leaves_checkpoints_metrics_and_an_offline_wandb_run(tmp_path: Path, capsys):
    seen = []

    def on_epoch_end(state: TrainerState) -> None:
        assert isinstance(state.policy, FastPolicy) and state.optimizer is state.trainer.optimizer
        (slot,) = state.lstm_h
        assert state.lstm_h[slot].shape == state.lstm_c[slot].shape == (6, state.policy.hidden_size)
        assert state.observations.shape == (24, 16, 200, 3) and state.observations.dtype == torch.uint8
        seen.append((state.epoch, state.agent_step))

    tool = tiny_tool(tmp_path, "smoke", total=3 * 384)
    train(tool, on_epoch_end=on_epoch_end)
    assert seen == [(1, 384), (2, 768), (3, 1152)]
    out = capsys.readouterr().out
    assert "579,862 parameters" in out

    run_dir = tmp_path / "smoke"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["metric/epoch"] for m in metrics] == [1, 2, 3]
    for key in ("metric/agent_step", "metric/total_time", "overview/sps", "experience/rewards"):
        assert key in metrics[-1]
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance"):
        assert f"losses/{key}" in metrics[-1]
    for m in metrics:  # every epoch's time split, from PuffeRL's profile taken every epoch
        parts = [m[f"performance/{part}_seconds"] for part in ("env", "forward", "update", "other")]
        assert all(seconds > 0 for seconds in parts)
        assert sum(parts) == pytest.approx(m["performance/epoch_seconds"], rel=0.1)
        assert m["overview/sps"] == pytest.approx(384 / m["performance/epoch_seconds"])
    assert "env/forward/update/other " in out

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert [n.split("__t")[0] for n in names] == ["smoke__e2__s768", "smoke__e3__s1152"]
    checkpoint = torch.load(run_dir / "checkpoints" / names[-1], weights_only=True)
    assert (checkpoint["epoch"], checkpoint["agent_step"]) == (3, 1152)
    assert checkpoint["architecture"]["widths"]["lstm1"] == 128
    assert checkpoint["optimizer_state_dict"]["state"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def shrink_lstm2(state: TrainerState) -> None:
    """What a collapse does to the live objects, crudely: shrink lstm2 to 64 units in place."""
    core, width = state.policy.core, 64
    old = core.lstm2
    gates = torch.cat([torch.arange(g * old.hidden_size, g * old.hidden_size + width) for g in range(4)])
    new = nn.LSTM(old.input_size, width, batch_first=True)
    with torch.no_grad():
        new.weight_ih_l0.copy_(old.weight_ih_l0[gates])
        new.weight_hh_l0.copy_(old.weight_hh_l0[gates][:, :width])
        new.bias_ih_l0.copy_(old.bias_ih_l0[gates])
        new.bias_hh_l0.copy_(old.bias_hh_l0[gates])
    core.lstm2 = new
    for head in (core.actor_1, core.critic_1):
        head.weight = nn.Parameter(head.weight.detach()[:, :width].clone())
        head.in_features = width
    optimizer = state.optimizer
    optimizer.param_groups[0]["params"] = list(state.policy.parameters())
    optimizer.state.clear()
    for buffers in (state.lstm_h, state.lstm_c):
        for slot, buffer in buffers.items():
            buffers[slot] = buffer.new_zeros(buffer.shape[0], state.policy.hidden_size)
    state.metrics["collapse/hidden_size"] = state.policy.hidden_size


def test_training_continues_after_the_epoch_hook_shrinks_the_policy_and_resumes_shrunk(tmp_path: Path):
    def on_epoch_end(state: TrainerState) -> None:
        if state.epoch == 1:
            shrink_lstm2(state)

    tool = tiny_tool(tmp_path, "shrunk", total=3 * 384, enabled=False)
    final = train(tool, on_epoch_end=on_epoch_end)
    assert final.policy.hidden_size == 128 + 64
    metrics = read_metrics(tmp_path / "shrunk" / "metrics.jsonl")
    assert metrics[0]["collapse/hidden_size"] == 192 and len(metrics) == 3

    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "shrunk" / "checkpoints", "shrunk"))
    assert checkpoint["architecture"]["widths"]["lstm2"] == 64
    assert policy_from_checkpoint(checkpoint).hidden_size == 192
    # resuming rebuilds the shrunk policy from its checkpoint alone
    tool = tiny_tool(tmp_path, "shrunk", total=4 * 384, enabled=False)
    assert train(tool).policy.hidden_size == 192


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path):
    overrides = [f"{key}={value}" for key, value in TINY.items()]
    command = [
        sys.executable,
        str(REPO / "tools" / "run.py"),
        "experiments.recipes.arena_basic_easy_shaped.train",
        "run=killed",
        f"train_dir={tmp_path}",
        "wandb.enabled=false",
        "trainer.checkpoint.checkpoint_interval=1",
        "trainer.checkpoint.wandb_checkpoint_interval=0",
        *overrides,
    ]
    checkpoints = tmp_path / "killed" / "checkpoints"
    process = subprocess.Popen([*command, "trainer.total_timesteps=1000000"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(checkpoints.glob("killed__e2__*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    last = load_checkpoint(latest_checkpoint(checkpoints, "killed"))
    assert last["epoch"] >= 2
    total = last["agent_step"] + 2 * 384
    result = subprocess.run([*command, f"trainer.total_timesteps={total}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"epoch {last['epoch']}, step {last['agent_step']}" in result.stdout
    metrics = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [m["metric/epoch"] for m in metrics] == list(range(1, last["epoch"] + 3))
    assert metrics[last["epoch"]]["metric/agent_step"] == last["agent_step"] + 384
    assert metrics[-1]["metric/agent_step"] == total


def test_an_epoch_without_a_finished_episode_keeps_the_console_columns(capsys):
    from metta_collapse.training.trainer import print_progress

    metrics = {"metric/epoch": 3, "metric/agent_step": 1152, "overview/sps": 100.0, "experience/rewards": 0.01}
    metrics |= {f"performance/{part}_seconds": 0.1 for part in ("env", "forward", "update", "other")}
    metrics |= {"metric/total_time": 5.0, "losses/policy_loss": 0.1, "losses/value_loss": 0.2, "losses/entropy": 1.6}
    print_progress(metrics | {"env_agent/heart.gained": 1.5}, 2000)
    print_progress(metrics, 2000)
    with_hearts, without = capsys.readouterr().out.splitlines()
    assert [cell.split()[0] for cell in with_hearts.split(" | ")] == [cell.split()[0] for cell in without.split(" | ")]
    assert "hearts/episode 1.50" in with_hearts and "hearts/episode –" in without
