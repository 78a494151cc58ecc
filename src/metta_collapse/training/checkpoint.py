"""Metta-style checkpoints, one self-contained file each: `<run>__e<epoch>__s<agent_step>__t<seconds>__sc0.pt`

A checkpoint holds the policy weights, the architecture spec with every layer width (so a shrunk policy
reloads without its original class arguments), the optimizer state, the epoch and the agent step. It contains
only tensors and plain Python values, so `torch.load(path, weights_only=True)` reads it.
"""

import glob
import os
import re
import warnings
from pathlib import Path

import torch

from metta_collapse.training.policy import FastPolicy, architecture, build_policy

CHECKPOINT_KEYS = {"epoch", "agent_step", "wall_time", "architecture", "policy_state_dict", "optimizer_state_dict"}


def checkpoint_name(run: str, epoch: int, agent_step: int, seconds: float, suffix: str = "") -> str:
    return f"{run}__e{epoch}__s{agent_step}__t{int(seconds)}__sc0{suffix}.pt"


def checkpoint_epochs(directory: Path, run: str) -> dict[int, Path]:
    """{epoch: path} of the run's checkpoints; files not named exactly like one (a pre-collapse copy, a
    temporary file) are ignored."""
    pattern = re.compile(rf"{re.escape(run)}__e(\d+)__s\d+__t\d+__sc\d+\.pt")
    return {int(m.group(1)): path for path in directory.glob("*.pt") if (m := pattern.fullmatch(path.name))}


def save_checkpoint(
    directory: Path,
    run: str,
    policy: FastPolicy,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    agent_step: int,
    wall_time: float,
    extra: dict | None = None,
    suffix: str = "",
    arena: str | None = None,
) -> Path:
    """Write atomically (temporary file, then rename), so a killed run never leaves a torn checkpoint.

    `extra`: plain values the run carries along (e.g. the record of its collapse)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(run, epoch, agent_step, wall_time, suffix)
    payload = {
        "run": run,
        "epoch": epoch,
        "agent_step": agent_step,
        "wall_time": wall_time,
        "architecture": architecture(policy),
        "policy_state_dict": policy.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "extra": extra or {},
        "arena": arena,  # the training environment (small | full), for tools that roll the policy out
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def latest_checkpoint(directory: Path, run: str) -> Path | None:
    """The checkpoint of `run` with the highest epoch."""
    epochs = checkpoint_epochs(directory, run)
    return epochs[max(epochs)] if epochs else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_checkpoint(directory: Path, run: str) -> tuple[Path | None, dict | None]:
    """The latest checkpoint of `run` that reads as one. One that does not (truncated, junk, another kind of
    file) is renamed aside to `<name>.corrupt`, never deleted, with a warning, and the one before it is tried.
    Temporary files of writes a kill interrupted are removed (the caller holds the run's lock)."""
    for tmp in directory.glob(f"{glob.escape(run)}__*.pt.tmp"):
        tmp.unlink()
    for _, path in sorted(checkpoint_epochs(directory, run).items(), reverse=True):
        try:
            checkpoint = load_checkpoint(path)
            if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
                raise ValueError("not a checkpoint of this project")
        except Exception as error:  # torch raises many types for a file that is not a checkpoint
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            message = f"checkpoint {path.name} is unreadable ({type(error).__name__}): moved to {aside.name}"
            warnings.warn(message, stacklevel=2)
            continue
        return path, checkpoint
    return None, None


def policy_from_checkpoint(checkpoint: dict) -> FastPolicy:
    """The policy with the checkpoint's own widths and weights (strict loading)."""
    policy = build_policy(checkpoint["architecture"])
    policy.load_state_dict(checkpoint["policy_state_dict"], strict=True)
    return policy
