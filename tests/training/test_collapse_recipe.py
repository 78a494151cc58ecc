"""experiments.recipes.collapse_arena: collapse in the live run, branches from a baseline, null models."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from planted import expand_fast
from test_training_run import tiny_tool

from metta_collapse import live
from metta_collapse.training.arena import make_small_arena, make_vecenv
from metta_collapse.training.checkpoint import (
    checkpoint_epochs,
    load_checkpoint,
    policy_from_checkpoint,
    save_checkpoint,
)
from metta_collapse.training.collapse import CollapseTrainTool
from metta_collapse.training.config import ConfigError
from metta_collapse.training.metrics import TIMING_FIELDS, read_metrics
from metta_collapse.training.policy import DEFAULT_WIDTHS, architecture, build_policy, make_policy
from metta_collapse.training.runner import build_tool
from metta_collapse.training.trainer import train

NARROW = dict(DEFAULT_WIDTHS, cnn1=8, cnn2=8, fc1=16, encoded_obs=16, lstm1=12, lstm2=10, actor_1=24, critic_1=32)
EPOCH = 384


def collapse_tool(tmp_path: Path, run: str | None, epochs: int, **collapse: object) -> CollapseTrainTool:
    base = tiny_tool(tmp_path, run or "unused", total=epochs * EPOCH, enabled=False)
    tool = CollapseTrainTool(**{name: getattr(base, name) for name in type(base).model_fields})
    tool.run = run
    tool.collapse.fit_steps = 1024  # the least a basis takes: fresh rollouts stay short
    tool.collapse.eval_steps = 32
    for key, value in collapse.items():
        target = tool.collapse.thresholds if key in ("linear", "cnn", "lstm", "critic") else tool.collapse
        setattr(target, key, value)
    return tool


def planted_run(tmp_path: Path, run: str, tool: CollapseTrainTool) -> None:
    """Start `run` from a policy whose every unit is copied twice (equal splits: training keeps the symmetry)."""
    vecenv = make_vecenv(make_small_arena(), 1)
    full = make_policy(vecenv.driver_env)
    vecenv.close()
    arch = architecture(full) | {"widths": NARROW}
    narrow = build_policy(arch)
    narrow.feature_scale.copy_(full.feature_scale)
    wide = expand_fast(narrow, 2)
    save_checkpoint(tmp_path / run / "checkpoints", run, wide, tool.make_optimizer(wide), 0, 0, 0.0)


def test_exact_collapse_of_a_trained_planted_policy_in_the_runtime(tmp_path: Path):
    tool = collapse_tool(tmp_path, "planted", 3, epoch_idx=2, metric="exact", eval_steps=256)
    planted_run(tmp_path, "planted", tool)
    final = train(tool, on_epoch_end=tool.on_epoch_end)
    record = json.loads((tmp_path / "planted" / "collapse.json").read_text())
    assert record["epoch"] == 2
    assert {layer["name"]: layer["width_after"] for layer in record["layers"]} | {} == {
        **{
            name: NARROW[name]
            for name in ("cnn1", "cnn2", "fc1", "encoded_obs", "lstm1", "lstm2", "actor_1", "critic_1")
        },
        "value": 1,
        "action_query_weight": 16,
        "action_embeddings": 16,
    }
    assert record["params_after"] < record["params_before"]
    assert record["kl_max"] <= 1e-6 and record["value_err"] <= 1e-5
    # the same behaviour on the same maps with the same draws: the task evaluation sees no difference at all
    assert record["eval_whole_episodes"] and (record["eval_maps"], record["eval_agents"]) == (4, 24)
    assert record["reward_before"] == record["reward_after"] > 0 and record["hearts_before"] == record["hearts_after"]
    # its ≤ 2 s is measured on the demo's record, not asserted here: the test machine is shared
    assert record["seconds_eval"] > 0 and "collapse/seconds_eval" in TIMING_FIELDS
    assert final.policy.hidden_size == NARROW["lstm1"] + NARROW["lstm2"]
    metrics = read_metrics(tmp_path / "planted" / "metrics.jsonl")
    assert metrics[1]["collapse/params_after"] == record["params_after"] and len(metrics) == 3
    assert metrics[1]["collapse/reward_after"] == record["reward_after"]
    pre = list((tmp_path / "planted" / "checkpoints").glob("*.precollapse.pt"))
    assert len(pre) == 1 and load_checkpoint(pre[0])["architecture"]["widths"]["lstm1"] == 2 * NARROW["lstm1"]


def test_resume_after_a_collapse_reloads_the_collapsed_shapes_and_never_collapses_again(tmp_path: Path):
    tool = collapse_tool(tmp_path, "resumed", 2, epoch_idx=1)
    train(tool, on_epoch_end=tool.on_epoch_end)
    record = (tmp_path / "resumed" / "collapse.json").read_text()
    params = json.loads(record)["params_after"]
    tool = collapse_tool(tmp_path, "resumed", 4, epoch_idx=1)
    final = train(tool, on_epoch_end=tool.on_epoch_end)
    assert sum(p.numel() for p in final.policy.parameters()) == params
    assert (tmp_path / "resumed" / "collapse.json").read_text() == record
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.precollapse.pt"))) == 1
    assert all("collapse/params_after" not in m for m in read_metrics(tmp_path / "resumed" / "metrics.jsonl")[2:])


def test_a_failed_collapse_rolls_back_is_recorded_and_training_goes_on_uncollapsed(tmp_path: Path, monkeypatch):
    tool = collapse_tool(tmp_path, "failing", 3, epoch_idx=2)
    checked = []

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    def on_epoch_end(state):
        if state.epoch != 2:
            return
        params = list(state.policy.parameters())
        values = [p.detach().clone() for p in params]
        adam = {id(p): {k: v.clone() for k, v in state.optimizer.state[p].items()} for p in params}
        buffers = dict(state.lstm_h), dict(state.lstm_c)
        monkeypatch.setattr(live, "behaviour_change", broken)  # fails after every object was rewritten
        tool.on_epoch_end(state)
        assert list(state.policy.parameters()) == params == state.optimizer.param_groups[0]["params"]
        assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
        assert all(torch.equal(state.optimizer.state[p][k], v) for p in params for k, v in adam[id(p)].items())
        assert all(state.lstm_h[k] is v for k, v in buffers[0].items())
        assert all(state.lstm_c[k] is v for k, v in buffers[1].items())
        assert "collapse" not in state.extra and not (tmp_path / "failing" / "collapse.json").exists()
        assert not list(tool.checkpoint_dir.glob("*"))  # the pre-collapse checkpoint was removed again
        assert state.extra["collapse_failed"]["error"] == "RuntimeError: injected" and state.checkpoint
        checked.append(True)

    train(tool, on_epoch_end=on_epoch_end)
    assert checked
    run = tmp_path / "failing"
    failure = json.loads((run / "collapse_failed.json").read_text())
    assert failure["epoch"] == 2
    assert [m.get("collapse/failed") for m in read_metrics(run / "metrics.jsonl")] == [None, 1.0, None]
    checkpoints = checkpoint_epochs(tool.checkpoint_dir, "failing")
    assert {2, 3} <= set(checkpoints)  # the failure is checkpointed at once, and training went on
    assert all(load_checkpoint(checkpoints[e])["architecture"]["widths"]["lstm1"] == 128 for e in (2, 3))
    resumed = collapse_tool(tmp_path, "failing", 4, epoch_idx=2)
    train(resumed, on_epoch_end=resumed.on_epoch_end)  # `broken` is still patched in: a retry would fail again
    assert [m.get("collapse/failed") for m in read_metrics(run / "metrics.jsonl")] == [None, 1.0, None, None]
    assert json.loads((run / "collapse_failed.json").read_text()) == failure


def baseline(tmp_path: Path) -> None:
    tool = collapse_tool(tmp_path, "base", 4, enabled=False)
    train(tool, on_epoch_end=tool.on_epoch_end)


def test_branches_restore_the_epoch_and_name_the_run_like_the_study(tmp_path: Path):
    baseline(tmp_path)
    source = load_checkpoint(checkpoint_epochs(tmp_path / "base" / "checkpoints", "base")[2])
    arms = {}
    for mode in ("fibration", "random_ablation", "scratch"):  # the study's arms: cosine fibers, no refit
        tool = collapse_tool(
            tmp_path, None, 2, init_from="base", epoch_idx=2, mode=mode, seed=5, metric="cosine", refit=False
        )
        tool.invoke()
        arms[mode] = tool.run
    assert arms == {
        "fibration": "base_epoch_2_base_0.7_0.5_1.0_0.8_norefit",
        "random_ablation": "base_epoch_2_ablationsrandom_0.7_0.5_1.0_0.8_norefit",
        "scratch": "base_epoch_2_small_scratch_0.7_0.5_1.0_0.8_norefit",
    }
    records = {mode: json.loads((tmp_path / run / "collapse.json").read_text()) for mode, run in arms.items()}
    assert len({r["params_after"] for r in records.values()}) == 1
    assert records["fibration"]["params_after"] < records["fibration"]["params_before"]
    # the ablated branch holds rows of the epoch-2 weights and their Adam state, index-selected
    run = arms["random_ablation"]
    branch = load_checkpoint(checkpoint_epochs(tmp_path / run / "checkpoints", run)[2])
    assert (branch["epoch"], branch["agent_step"]) == (2, source["agent_step"])
    name = "core.critic_1.weight"
    old, new = source["policy_state_dict"][name], branch["policy_state_dict"][name]
    assert new.shape[0] < old.shape[0] and new.shape[1] == old.shape[1]
    rows = torch.cat([(old == row).all(1).nonzero()[0] for row in new])
    position = [n for n, _ in policy_from_checkpoint(source).named_parameters()].index(name)
    old_adam, new_adam = (c["optimizer_state_dict"]["state"][position] for c in (source, branch))
    assert torch.equal(new_adam["exp_avg_sq"], old_adam["exp_avg_sq"][rows]) and new_adam["step"] == old_adam["step"]
    # the branch shares the baseline's history up to the branch point, and the scratch arm starts from zero
    assert [m["metric/epoch"] for m in read_metrics(tmp_path / arms["fibration"] / "metrics.jsonl")] == [1, 2]
    scratch = arms["scratch"]
    assert sorted(checkpoint_epochs(tmp_path / scratch / "checkpoints", scratch)) == [0, 2]


def test_bad_collapse_settings_fail_before_training(tmp_path: Path):
    baseline(tmp_path)
    common = [
        "experiments.recipes.collapse_arena.train",
        f"train_dir={tmp_path}",
        "trainer.batch_size=384",
        "trainer.minibatch_size=192",
        "trainer.bptt_horizon=16",
        "training_env.arena=small",
    ]
    cases = {
        "collapse.epoch_idx=99999": "collapse.epoch_idx=99999 is beyond this run's last epoch",
        "collapse.thresholds.cnn=2.5": "collapse.thresholds.cnn",
        "collapse.mode=prune": "collapse.mode",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_tool([*common, "run=bad", "trainer.total_timesteps=768", override]).invoke()
    with pytest.raises(ConfigError, match="runs with checkpoints: base"):
        build_tool([*common, "collapse.init_from=nope"]).invoke()
    with pytest.raises(ConfigError, match="its checkpoint epochs: 2, 4"):
        build_tool([*common, "collapse.init_from=base", "collapse.epoch_idx=3"]).invoke()
    assert not (tmp_path / "bad").exists()


def test_a_branch_name_already_taken_by_other_settings_is_refused(tmp_path: Path):
    baseline(tmp_path)
    collapse_tool(tmp_path, "b", 2, init_from="base", epoch_idx=2).invoke()
    collapse_tool(tmp_path, "b", 2, init_from="base", epoch_idx=2).invoke()  # the same branch resumes
    for settings, field in (
        ({"optimizer_state": "reset"}, "collapse.optimizer_state=remap"),
        ({"epoch_idx": 4}, "collapse.epoch_idx=2"),  # another source epoch under the same name
        ({"init_from": "other"}, "collapse.init_from=base"),  # another source run
    ):
        if "init_from" in settings:
            shutil.copytree(tmp_path / "base", tmp_path / "other")
            for path in (tmp_path / "other" / "checkpoints").iterdir():
                path.rename(path.with_name(path.name.replace("base__", "other__")))
        with pytest.raises(ConfigError, match=f"run 'b' was collapsed with other collapse settings \\({field}\\)"):
            collapse_tool(tmp_path, "b", 2, **({"init_from": "base", "epoch_idx": 2} | settings)).invoke()


def test_a_live_run_that_collapsed_resumes_only_with_its_settings_and_a_lost_record_is_restored(tmp_path: Path):
    collapse_tool(tmp_path, "live", 2, epoch_idx=1, metric="cosine").invoke()
    record = json.loads((tmp_path / "live" / "collapse.json").read_text())
    (tmp_path / "live" / "collapse.json").unlink()  # killed between the checkpoint and the record
    with pytest.raises(ConfigError, match="other collapse settings \\(collapse.metric=cosine\\)"):
        collapse_tool(tmp_path, "live", 3, epoch_idx=1).invoke()
    collapse_tool(tmp_path, "live", 3, epoch_idx=1, metric="cosine").invoke()
    assert json.loads((tmp_path / "live" / "collapse.json").read_text()) == record
    assert [m["metric/epoch"] for m in read_metrics(tmp_path / "live" / "metrics.jsonl")] == [1, 2, 3]


def test_the_size_is_set_by_exactly_one_knob(tmp_path: Path):
    common = ["experiments.recipes.collapse_arena.train", f"train_dir={tmp_path}", "run=x"]
    cases = {
        ("collapse.thresholds.lstm=1.2",): "collapse.thresholds.* is not a knob of collapse.metric=basis",
        ("collapse.metric=cosine", "collapse.rank_tol.lstm=0.1"): "collapse.rank_tol.* is not a knob of",
        ("collapse.budget.params=0.3", "collapse.rank_tol.cnn=0.1"): "the collapse's size is set twice",
        ("collapse.metric=cosine", "collapse.budget.kl=0.001", "collapse.thresholds.cnn=0.4"): "set twice",
        ("collapse.metric=exact", "collapse.budget.params=0.5"): "it has no size to budget",
        ("collapse.metric=exact", "collapse.budget.macs=0.5"): "it has no size to budget",
        ("collapse.budget.macs=0.3", "collapse.rank_tol.cnn=0.1"): "the collapse's size is set twice",
        ("collapse.fit_steps=500",): "needs at least 1000 agent steps",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_tool([*common, *overrides]).invoke()
    with pytest.raises(ConfigError, match="budget.params and budget.kl"):
        build_tool([*common, "collapse.budget.params=0.3", "collapse.budget.kl=0.01"])
    with pytest.raises(ConfigError, match="not budget.params and budget.macs"):
        build_tool([*common, "collapse.budget.params=0.3", "collapse.budget.macs=0.3"])
    assert not (tmp_path / "x").exists()


def test_refit_units_and_budget_name_the_branch_and_a_branch_never_resumes_another(tmp_path: Path):
    baseline(tmp_path)
    names = {}
    for label, settings in {
        "default": {},
        "budget": {"budget": live.Budget(params=0.4)},
        "plain": {"refit": False, "budget": live.Budget(params=0.4)},
        "cosine": {"metric": "cosine"},
    }.items():
        tool = collapse_tool(tmp_path, None, 2, init_from="base", epoch_idx=2, **settings)
        tool.invoke()
        names[label] = tool.run
        record = json.loads((tmp_path / tool.run / "collapse.json").read_text())
        assert record["refit"] == settings.get("refit", True) and record["metric"] == settings.get("metric", "basis")
        assert record["measured_on"].startswith("report part: ")
        if "budget" in settings:
            assert record["params_after"] <= 0.4 * record["params_before"]
    assert names == {
        "default": "base_epoch_2_base_basis_0.01_0.01_0.01_0.01",
        "budget": "base_epoch_2_base_basis_params0.4",
        "plain": "base_epoch_2_base_basis_params0.4_norefit",
        "cosine": "base_epoch_2_base_0.7_0.5_1.0_0.8",
    }
    for label, settings in {"refit": {"refit": False}, "budget": {"budget": live.Budget(params=0.3)}}.items():
        tool = collapse_tool(tmp_path, names["default"], 2, init_from="base", epoch_idx=2, **settings)
        with pytest.raises(ConfigError, match=f"other collapse settings.*collapse.{label}="):
            tool.invoke()


def test_live_symmetry_logs_what_a_collapse_would_do_now(tmp_path: Path):
    tool = collapse_tool(tmp_path, "watched", 2, enabled=False, symmetry_interval=2)
    tool.collapse.budget = live.Budget(params=0.5)
    train(tool, on_epoch_end=tool.on_epoch_end)
    first, second = read_metrics(tmp_path / "watched" / "metrics.jsonl")
    assert not any(key.startswith("symmetry/") for key in first)
    # a collapse to half the parameters changes the policy a little, measurably: neither nothing nor everything
    assert 0.3 < second["symmetry/kept"] <= 0.5 and 0 < second["symmetry/kl_mean"] < 0.1
    assert 0.5 < second["symmetry/top1"] <= 1 and 0 < second["symmetry/value_err"] < 1
    assert load_checkpoint(checkpoint_epochs(tool.checkpoint_dir, "watched")[2])["architecture"]["widths"] == dict(
        DEFAULT_WIDTHS
    )


def test_one_command_with_one_seed_repeats_exactly_apart_from_the_timing_fields(tmp_path: Path):
    runs = []
    for run in ("first", "second"):
        collapse_tool(tmp_path, run, 4, epoch_idx=2).invoke()
        metrics = [
            {k: v for k, v in m.items() if k not in TIMING_FIELDS}
            for m in read_metrics(tmp_path / run / "metrics.jsonl")
        ]
        record = json.loads((tmp_path / run / "collapse.json").read_text())
        runs.append((metrics, {k: v for k, v in record.items() if k not in TIMING_FIELDS}))
    assert runs[0] == runs[1] and len(runs[0][0]) == 4 and runs[0][1]["epoch"] == 2


def test_a_resumed_run_draws_afresh_instead_of_replaying_its_opening(tmp_path: Path):
    draws = {}

    def draw(state) -> None:
        draws[state.epoch] = (torch.rand(1).item(), float(__import__("numpy").random.random()))

    tool = collapse_tool(tmp_path, "resumed", 2, enabled=False)
    train(tool, on_epoch_end=draw)
    tool.trainer.total_timesteps = 4 * EPOCH
    train(tool, on_epoch_end=draw)
    assert sorted(draws) == [1, 2, 3, 4]
    assert draws[3] != draws[1]  # the resumed segment's first epoch against the opening's


def test_the_task_evaluation_plays_both_policies_alike_and_tells_them_apart(tmp_path: Path):
    tool = collapse_tool(tmp_path, "evaluated", 1, eval_steps=64)
    vecenv = make_vecenv(make_small_arena(), 1)
    policy = make_policy(vecenv.driver_env)
    noop = vecenv.driver_env.current_simulation.action_names.index("noop")
    vecenv.close()
    same = tool.evaluate_in_task(policy, copy.deepcopy(policy), epoch=3)
    assert same["reward_before"] == same["reward_after"] > 0 and same["hearts_se_before"] == same["hearts_se_after"]
    assert (same["eval_steps"], same["eval_maps"], same["eval_agents"], same["eval_whole_episodes"]) == (
        64,
        4,
        24,
        False,
    )
    idle = copy.deepcopy(policy)
    idle.forward_eval = lambda tokens, state: (torch.eye(5)[noop].log().expand(len(tokens), 5), None)
    changed = tool.evaluate_in_task(policy, idle, epoch=3)
    assert changed["reward_before"] == same["reward_before"] and changed["reward_after"] == changed["hearts_after"] == 0
