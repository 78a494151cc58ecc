"""The current-era component under torch.distributed: two CPU processes (gloo) with stand-ins of Metta's
DistributedHelper and DistributedPolicy (a DistributedDataParallel wrapper) collapse their replicas on rank 0's
rollouts, rebuild the wrapper in place and stay identical; a failure on one rank is undone on both."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_metta import SECTION, CurrentFast, FastConfig, StandInComponentBase, adam_with_state, plant

from metta_collapse import live
from metta_collapse.integrations import current
from metta_collapse.integrations import hook as hooks


class StandInDistributedPolicy(torch.nn.parallel.DistributedDataParallel):
    """What the adapter uses of Metta's DistributedPolicy: built as (policy, device), attributes of the policy."""

    def __init__(self, policy: torch.nn.Module, device: torch.device):
        super().__init__(policy, broadcast_buffers=False)

    def __getattr__(self, name: str):  # noqa: ANN204
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class StandInDistributedHelper:
    """What the adapter uses of Metta's DistributedHelper."""

    is_distributed = True

    def broadcast_from_master(self, value: object) -> object:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class TrainedFast(CurrentFast):
    """The stand-in with every parameter in its forward pass, as DistributedDataParallel (Metta's, without
    find_unused_parameters) needs for its gradients to be averaged."""

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.core(self.cnn_encoder(box))
        critic = torch.tanh(self.critic_1.module(core))
        value = self.value_head.module(critic) + self.gtd_aux.module(critic)
        return self.actor_logits.module(torch.relu(self.actor_1.module(core))), value


def train_step(wrapper: torch.nn.Module, optimizer: torch.optim.Optimizer, box: torch.Tensor) -> None:
    optimizer.zero_grad()
    logits, value = wrapper(box)
    (logits.square().mean() + value.square().mean()).backward()  # the wrapper averages the gradients
    optimizer.step()


def replica(rank: int, world: int, folder: str, fail_rank: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each process plants other weights: the wrapper starts every replica from rank 0's
    wrapper = StandInDistributedPolicy(plant(TrainedFast(), skip=("core",)), torch.device("cpu"))
    optimizer = adam_with_state(wrapper)
    context = SimpleNamespace(
        policy=wrapper, optimizer=optimizer, epoch=0, agent_step=0, distributed=StandInDistributedHelper()
    )
    hook = hooks.CollapseHook(SECTION(epoch_idx=3, metric="exact", fit_steps=6), "current")
    component = current.component_class(StandInComponentBase)(hook, FastConfig())
    component.register(context)
    component.on_epoch_end(2)  # from here on each process records its own rollouts
    with torch.no_grad():
        wrapper.module(torch.rand(12, 24, 11, 11))
    if rank == fail_rank:

        def broken(*args: object, **kwargs: object) -> None:  # after this replica has been rewritten
            raise RuntimeError("injected")

        live.remap_optimizer = broken
    error = None
    try:
        component.on_epoch_end(3)
    except hooks.CollapseFailed as failure:
        error = str(failure)
    digests = [live.fingerprint(wrapper.module, optimizer)]
    train_step(wrapper, optimizer, torch.rand(12, 24, 11, 11))  # each process its own data
    digests.append(live.fingerprint(wrapper.module, optimizer))
    outcome = {
        "error": error,
        "digests": digests,
        "critic": wrapper.module.critic_1.module.out_features,
        "marked": getattr(wrapper, hooks.MARKER, None) is not None,
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def run(tmp_path: Path, fail_rank: int = -1) -> list[dict]:
    processes = mp.start_processes(replica, args=(2, str(tmp_path), fail_rank), nprocs=2, join=False)
    deadline = time.time() + 180  # a rank left waiting on the other would hang here
    while not processes.join(timeout=1):
        if time.time() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the replicas did not finish: a collective waits on a rank that skipped it")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_replicas_collapse_on_rank_0s_rollouts_and_train_on_identical(tmp_path: Path):
    ranks = run(tmp_path)
    assert [r["error"] for r in ranks] == [None, None] and all(r["marked"] for r in ranks)
    assert [r["critic"] for r in ranks] == [512, 512]  # the planted fibration halves critic_1's 1024 units
    assert ranks[0]["digests"] == ranks[1]["digests"]  # after the collapse, and after a step on different data


def test_a_failure_on_one_rank_leaves_both_replicas_uncollapsed_and_identical(tmp_path: Path):
    ranks = run(tmp_path, fail_rank=1)
    assert all("rank 1: RuntimeError: injected" in r["error"] for r in ranks)
    assert [r["critic"] for r in ranks] == [1024, 1024] and not any(r["marked"] for r in ranks)
    assert ranks[0]["digests"] == ranks[1]["digests"]
