"""The data every collapse and report rests on is what it says: real frames, maps from the seed, held-out maps
that no training run plays, null models at the method's widths, and a refit that is the least-squares solve."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_collapse_recipe import collapse_tool
from test_live import tokens
from test_planted import mlp
from test_refit import random_policy

import metta_collapse as mc
from metta_collapse.training import arena, trainer
from metta_collapse.training.arena import EPISODE_BITS, make_small_arena, map_seed
from metta_collapse.training.collapse import collapse_copy, policy_data
from metta_collapse.training.rollout import rollouts
from metta_collapse.training.trainer import train


class Recorder:
    """A stand-in policy acting uniformly at random that keeps its own copy of every observation it is given."""

    def __init__(self):
        self.feature_scale = torch.ones(1)
        self.seen: list[torch.Tensor] = []

    def forward_eval(self, observations: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(observations.clone())
        return torch.zeros(len(observations), 5), torch.zeros(len(observations))


def test_recorded_frames_change_along_time_and_are_what_the_policy_saw():
    recorder = Recorder()
    observations, _, _ = rollouts(recorder, make_small_arena(), copies=2, steps=20, seed=3, stream="report")
    assert torch.equal(observations, torch.stack(recorder.seen, dim=1))
    for agent in observations:
        assert len({frame.numpy().tobytes() for frame in agent}) >= 10  # agents moving at random see new frames


def first_frames(seed: int, stream: str = "report", copies: int = 3) -> torch.Tensor:
    return rollouts(Recorder(), make_small_arena(), copies=copies, steps=1, seed=seed, stream=stream)[0][:, 0]


def test_a_rollouts_maps_follow_its_seed_and_its_stream():
    agents = make_small_arena().game.num_agents
    one = first_frames(1)
    assert torch.equal(one, first_frames(1))
    for other in (first_frames(2), first_frames(1, "fit")):
        for copy_index in range(3):  # every copy meets another map
            rows = slice(copy_index * agents, (copy_index + 1) * agents)
            assert not torch.equal(one[rows], other[rows])
    assert not torch.equal(one[:agents], one[agents : 2 * agents])  # and copies of one rollout differ


def test_training_runs_with_two_seeds_meet_different_first_maps(tmp_path: Path):
    first = {}
    for seed in (0, 1):
        tool = collapse_tool(tmp_path, f"s{seed}", 1, enabled=False)
        tool.seed = seed

        def keep_first_frames(state: trainer.TrainerState, seed: int = seed) -> None:
            first[seed] = state.observations[:6, 0].clone()  # row r holds agent r % agents: the first 6 agents

        train(tool, on_epoch_end=keep_first_frames)
    assert not torch.equal(first[0], first[1])


def test_held_out_parts_never_play_a_map_of_training_or_of_another_part(tmp_path: Path, monkeypatch):
    """Every map seed a vector env can reach (its copies' bases, each plus up to 2**EPISODE_BITS episodes), for
    the fit, select and report parts of a branch's collapse, the task evaluation, and training."""
    made: list[set[int]] = []  # each vector env's copies' bases (Serial makes copy 0 twice)
    make_env = arena.make_env

    def recording_make_env(*args, maps: int | None = None, **kwargs):
        made[-1].add(maps)
        return make_env(*args, maps=maps, **kwargs)

    def recording_make_vecenv(*args, **kwargs):
        made.append(set())
        return make_vecenv(*args, **kwargs)

    make_vecenv = arena.make_vecenv
    monkeypatch.setattr(arena, "make_env", recording_make_env)
    monkeypatch.setattr("metta_collapse.training.rollout.make_vecenv", recording_make_vecenv)
    monkeypatch.setattr(trainer, "make_vecenv", recording_make_vecenv)
    tool = collapse_tool(tmp_path, "t", 1, enabled=False)
    tool.training_env.num_envs = 2
    train(tool)
    policy = random_policy()
    tool.collapse.fit_steps = 4096
    tool.collapse_parts(policy, None)
    tool.evaluate_in_task(policy, policy, 0)
    assert len(made) == 1 + 3 + 2  # training; select, report, fit; the evaluation's two policies
    training, select, report, fit, evaluation, again = made
    assert evaluation == again and len(fit) >= 2  # both policies play the same maps; the fit part several
    uses = {"training": training, "select": select, "report": report, "fit": fit, "evaluation": evaluation}
    spans = sorted((base, base + 2**EPISODE_BITS, use) for use, bases in uses.items() for base in bases)
    for (_, end, use), (start, _, other) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{use} and {other} can meet one map"
    assert training == {map_seed("train", tool.seed, copy) for copy in range(2)}


@pytest.mark.parametrize("budget", [mc.Budget(params=0.4), mc.Budget(kl=1e-3)], ids=["params", "kl"])
def test_null_models_get_exactly_the_methods_widths(budget: mc.Budget):
    policy = random_policy()
    data = policy_data(policy, tokens(32, 40, 1), tokens(16, 40, 2), tokens(8, 40, 3), "test")
    widths = {}
    for mode in ("fibration", "random_ablation", "scratch"):
        record = collapse_copy(policy, data, mc.CollapseConfig(metric="basis"), True, budget, mode=mode, seed=5)
        widths[mode] = {layer["name"]: layer["width_after"] for layer in record["layers"]}
    assert widths["random_ablation"] == widths["scratch"] == widths["fibration"]
    assert any(record["layers"][i]["width_after"] < record["layers"][i]["width_before"] for i in range(4))


def test_the_refit_is_the_least_squares_solve_on_the_recorded_activations():
    """Each refitted Linear equals a ridge solve in numpy (toward the applied weights, bias free, λ = 1e-3 × the
    mean diagonal of the centred Gram matrix) on the refitted network's own inputs to it and the original's
    pre-activations of the units it kept."""
    torch.manual_seed(0)
    net, x = mlp([8, 32, 16, 4]), torch.randn(2000, 8)
    original = copy.deepcopy(net)
    plan, kept, _ = mc.select_basis(net, (x,), params=0.5)
    mc.keep(net, plan, kept)
    applied = copy.deepcopy(net)
    mc.refit(net, original, plan, (x,))
    inputs, targets = [], []
    with torch.no_grad():
        h, g = x, x
        for index, (layer, source) in enumerate(zip(net, original, strict=True)):
            if isinstance(layer, torch.nn.Linear):
                inputs.append(h.double().numpy())
                units = kept.get(str(index), np.arange(source.out_features))
                targets.append(source(g)[:, units].double().numpy())
            h, g = layer(h), source(g)
    refitted = [m for m in net if isinstance(m, torch.nn.Linear)]
    starts = [m for m in applied if isinstance(m, torch.nn.Linear)]
    moved = []
    for a, t, layer, start in zip(inputs, targets, refitted, starts, strict=True):
        w0 = start.weight.detach().double().numpy()
        ac, tc = a - a.mean(0), t - t.mean(0)
        gram = ac.T @ ac
        lam = 1e-3 * gram.diagonal().mean()
        w = np.linalg.solve(gram + lam * np.eye(len(gram)), ac.T @ tc + lam * w0.T).T
        b = t.mean(0) - w @ a.mean(0)
        moved.append(np.abs(w - w0).max() > 1e-3)
        np.testing.assert_allclose(layer.weight.detach().double().numpy(), w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.bias.detach().double().numpy(), b, rtol=1e-4, atol=1e-5)
    assert moved == [False, True, True]  # the first layer's kept units are its own: nothing to fit
