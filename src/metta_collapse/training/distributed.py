"""One training process per rank under torchrun: its process group, its replica, who writes. In a run started
without torchrun everything here is a no-op."""

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start(device: str) -> None:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), once per process, of any size (1 included); a
    run started without torchrun (no LOCAL_RANK) has none."""
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body (writes files, cleans up) before the other ranks run it."""
    if dist.is_initialized() and not is_main():
        dist.barrier()
    yield
    if dist.is_initialized() and is_main():
        dist.barrier()


def replica(policy: nn.Module) -> nn.Module:
    """The policy as PuffeRL trains it: under torchrun a DistributedDataParallel wrapper, which averages the
    gradients and starts from rank 0's parameters; PuffeRL also calls `forward_eval` and reads `hidden_size`."""
    if not dist.is_initialized():
        return policy
    wrapper = nn.parallel.DistributedDataParallel(policy)
    wrapper.forward_eval = policy.forward_eval
    wrapper.hidden_size = policy.hidden_size
    return wrapper


def unwrap(policy: nn.Module) -> nn.Module:
    return policy.module if isinstance(policy, nn.parallel.DistributedDataParallel) else policy


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
