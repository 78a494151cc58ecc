import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from metta_collapse.cli import main
from metta_collapse.training.checkpoint import save_checkpoint
from metta_collapse.training.policy import FastCore, FastPolicy
from metta_collapse.training.report import learning_curve, load_run, plot_symmetry

WIDTHS = {
    "cnn1": 4,
    "cnn2": 4,
    "fc1": 8,
    "encoded_obs": 8,
    "lstm1": 8,
    "lstm2": 8,
    "actor_1": 8,
    "critic_1": 8,
    "action_embedding": 2,
}
# 3 features, 5 actions, 11x11 window (the convolutions leave 1x1):
# cnn1 4*3*25+4, cnn2 4*4*9+4, fc1 8*4+8, encoded_obs 8*8+8, two LSTMs 2*(4*8*8)+2*32 each,
# critic_1 8*8+8, value 8+1, actor_1 8*8+8, action_query_weight 8*2, action_embeddings 5*2, action_bias 5
PARAMS = 304 + 148 + 40 + 72 + 2 * 576 + 72 + 9 + 72 + 16 + 10 + 5
# critic_1 units in identical pairs: 4 of its rows (8 weights + bias) go, and 4 columns of value
CRITIC_HALVED = PARAMS - 4 * 9 - 4
# and actor_1's: 4 of its rows, and 4 rows (of 2) of action_query_weight
BOTH_HALVED = CRITIC_HALVED - 4 * 9 - 4 * 2
EXACT = ["--linear", "0", "--cnn", "0", "--lstm", "0", "--critic", "0"]


def tiny_policy(duplicated: tuple[str, ...]) -> FastPolicy:
    policy = FastPolicy(FastCore(3, 11, 11, 5, WIDTHS), 11, 11, torch.ones(3))
    with torch.no_grad():
        for name in duplicated:
            layer = getattr(policy.core, name)
            layer.weight[1::2] = layer.weight[0::2]
            layer.bias[1::2] = layer.bias[0::2]
    return policy


def save(run_dir: Path, policy: FastPolicy, epoch: int) -> Path:
    optimizer = torch.optim.Adam(policy.parameters())
    return save_checkpoint(run_dir / "checkpoints", run_dir.name, policy, optimizer, epoch, 100 * epoch, 10.0 * epoch)


def write_metrics(run_dir: Path, rewards: dict[int, float], collapse: dict | None = None) -> None:
    """Epoch e at agent step 100 e and 10 e seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "metric/epoch": epoch,
            "metric/agent_step": 100 * epoch,
            "metric/total_time": 10.0 * epoch,
            "overview/sps": 10.0,
            "experience/rewards": reward,
        }
        for epoch, reward in rewards.items()
    ]
    if collapse is not None:
        record = {
            "metric": "cosine",
            "thresholds": {},
            "params_before": PARAMS,
            "seconds": 0.1,
            "layers": [],
            "kl_mean": 0.01,
            "value_err": 0.2,
        }
        (run_dir / "collapse.json").write_text(json.dumps({**record, **collapse}))
        for line in lines:
            if line["metric/epoch"] == collapse["epoch"]:
                line["collapse/params_after"] = collapse["params_after"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`base`: 3 checkpoints with more and more duplicated units, and rewards 1..10 over epochs 1..10.
    `c1`: collapsed in-process at epoch 5; `b1`: branched from base at epoch 5 as a random ablation; `s1`: the small
    network trained from scratch."""
    root = tmp_path_factory.mktemp("train_dir")
    base = root / "base"
    torch.manual_seed(0)
    first = save(base, tiny_policy(()), 1)
    save(base, tiny_policy(("critic_1",)), 2)
    last = save(base, tiny_policy(("critic_1", "actor_1")), 3)
    # not a regular checkpoint, as its name says: the analysis must skip it
    shutil.copy(first, last.with_name(last.name.replace(".pt", ".precollapse.pt")))
    write_metrics(base, {epoch: float(epoch) for epoch in range(1, 11)})
    c1_rewards = [1, 2, 3, 4, 5, 0, 2, 4, 6, 6]
    write_metrics(
        root / "c1",
        {epoch: float(reward) for epoch, reward in enumerate(c1_rewards, 1)},
        {"epoch": 5, "agent_step": 500, "mode": "fibration", "params_after": 1000},
    )
    write_metrics(
        root / "b1",
        {6: 1.0, 7: 3.0, 8: 3.0, 9: 5.0, 10: 5.0},
        {"epoch": 5, "agent_step": 500, "mode": "random_ablation", "params_after": 1200},
    )
    write_metrics(
        root / "s1",
        {epoch: float(reward) for epoch, reward in enumerate([0, 0, 1, 1, 2, 2, 3, 4, 4, 5], 1)},
        {"epoch": 0, "agent_step": 0, "mode": "scratch", "params_after": 1000},
    )
    return root


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_row(text: str, first: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])


def test_analyze_checkpoint_prints_the_layer_table(train_dir: Path, capsys: pytest.CaptureFixture):
    checkpoint = next((train_dir / "base" / "checkpoints").glob("base__e3__*__sc0.pt"))
    code, out, _ = run_cli(capsys, "analyze", str(checkpoint), *EXACT)
    assert code == 0
    assert "epoch 3, agent step 300" in out
    assert table_row(out, "critic_1") == ["critic_1", "critic", "8", "4", "50.0%"]
    assert table_row(out, "actor_1") == ["actor_1", "linear", "8", "4", "50.0%"]
    assert table_row(out, "lstm1") == ["lstm1", "lstm", "8", "8", "100.0%"]
    assert table_row(out, "parameters") == ["parameters", str(PARAMS), str(BOTH_HALVED), f"{BOTH_HALVED / PARAMS:.1%}"]

    code, out, _ = run_cli(capsys, "analyze", str(checkpoint), *EXACT, "--json")
    plan = json.loads(out)
    assert (plan["params_before"], plan["params_after"]) == (PARAMS, BOTH_HALVED)
    critic = next(layer for layer in plan["layers"] if layer["name"] == "critic_1")
    assert critic["width_after"] == 4 and critic["partition"] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_analyze_run_writes_the_symmetry_curve(train_dir: Path, capsys: pytest.CaptureFixture):
    code, out, _ = run_cli(capsys, "analyze", "base", "--train-dir", str(train_dir), *EXACT)
    assert code == 0
    expected = [(1, 100, PARAMS), (2, 200, CRITIC_HALVED), (3, 300, BOTH_HALVED)]
    for epoch, step, kept in expected:
        assert table_row(out, str(epoch))[:5] == [str(epoch), str(step), str(PARAMS), str(kept), f"{kept / PARAMS:.3f}"]
    header = next(re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith("epoch"))
    assert [table_row(out, str(epoch))[header.index("critic_1")] for epoch in (1, 2, 3)] == ["8/8", "4/8", "4/8"]

    curve = json.loads((train_dir / "base" / "symmetry.json").read_text())
    points = curve["points"]
    # the pre-collapse copy is skipped
    assert [(p["epoch"], p["agent_step"], p["params_after"]) for p in points] == expected
    assert [p["kept_fraction"] for p in points] == pytest.approx([kept / PARAMS for *_, kept in expected])
    assert [p["layers"]["critic_1"]["kept_fraction"] for p in points] == [1.0, 0.5, 0.5]
    assert [p["layers"]["actor_1"]["kept_fraction"] for p in points] == [1.0, 1.0, 0.5]
    assert curve["config"]["thresholds"] == {"linear": 0.0, "cnn": 0.0, "lstm": 0.0, "critic": 0.0}
    assert (train_dir / "base" / "symmetry.png").stat().st_size > 0

    lines = {line.get_label(): line for line in plot_symmetry(curve).axes[0].get_lines()}
    assert list(lines["parameters"].get_xdata()) == [100, 200, 300]
    assert list(lines["parameters"].get_ydata()) == pytest.approx([kept / PARAMS for *_, kept in expected])
    assert list(lines["actor_1"].get_ydata()) == [1.0, 1.0, 0.5]
    assert "critic_1" in lines and any(label.startswith("cnn1, cnn2, fc1 +") for label in lines)  # one line at 1.0


def test_analyze_measures_a_collapsed_run_against_its_original_network(tmp_path: Path, capsys: pytest.CaptureFixture):
    run_dir = tmp_path / "c2"
    save(run_dir, tiny_policy(()), 1)
    small = FastPolicy(FastCore(3, 11, 11, 5, dict(WIDTHS, critic_1=4)), 11, 11, torch.ones(3))
    small_params = sum(p.numel() for p in small.parameters())
    layers = [{"name": "critic_1", "kind": "critic", "width_before": 8, "width_after": 4, "partition": []}]
    record = {"mode": "fibration", "epoch": 2, "agent_step": 200, "params_before": PARAMS, "params_after": small_params}
    optimizer = torch.optim.Adam(small.parameters())
    extra = {"collapse": record | {"layers": layers}}
    path = save_checkpoint(run_dir / "checkpoints", "c2", small, optimizer, 2, 200, 20.0, extra=extra)

    code, out, _ = run_cli(capsys, "analyze", str(path), "--metric", "exact")
    assert code == 0 and f"already collapsed (fibration) at epoch 2: {PARAMS:,} -> {small_params:,}" in out
    assert "(exact, tolerance 0.0001)" in out and "thresholds" not in out

    code, out, _ = run_cli(capsys, "analyze", "c2", "--train-dir", str(tmp_path), "--metric", "exact")
    curve = json.loads((run_dir / "symmetry.json").read_text())
    assert curve["collapsed_at"] == 200 and [p["collapsed"] for p in curve["points"]] == [False, True]
    assert [p["kept_fraction"] for p in curve["points"]] == [1.0, small_params / PARAMS]  # of the original network
    assert [p["layers"]["critic_1"]["kept_fraction"] for p in curve["points"]] == [1.0, 0.5]
    assert table_row(out, "2*")[:2] == ["2*", "200"] and "* a checkpoint already collapsed" in out
    cut = [line for line in plot_symmetry(curve).axes[0].get_lines() if line.get_label() == "the run's collapse"]
    assert list(cut[0].get_xdata()) == [200, 200]


def test_analyze_every_nth_checkpoint_keeps_the_last_and_writes_to_out(
    train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    code, _, _ = run_cli(capsys, "analyze", str(train_dir / "base"), "--every", "2", "--out", str(tmp_path), *EXACT)
    assert code == 0
    curve = json.loads((tmp_path / "symmetry.json").read_text())
    assert [p["epoch"] for p in curve["points"]] == [1, 3]
    assert (tmp_path / "symmetry.png").is_file()


def compare(train_dir: Path, out: Path, capsys: pytest.CaptureFixture, *argv: str) -> tuple[dict, str]:
    code, text, err = run_cli(capsys, "compare", *argv, "--train-dir", str(train_dir), "--out", str(out), "--last", "3")
    assert code == 0, err
    return json.loads((out / "compare.json").read_text()), text


def test_compare_summarises_runs_against_the_baseline(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    summary, text = compare(train_dir, tmp_path, capsys, "base", "c1", "b1")
    # base's rewards are 1..10; its level before the collapse at step 500 is the mean of epochs 3..5
    assert summary["baseline"] == "base"
    assert summary["collapse_x"] == 500 and summary["auc_span"] == [500, 1000]
    assert summary["baseline_before_collapse"] == 4.0
    rows = {row["run"]: row for row in summary["runs"]}
    assert rows["base"] == {
        "run": "base",
        "arm": "baseline",
        "seed": None,  # it has no config.json
        "mode": None,
        "params": PARAMS,  # its latest checkpoint
        "kept": None,
        "kl_mean": None,
        "value_err": None,
        "collapse_x": None,
        "last_mean": 9.0,
        # trapezoids of width 100 from step 500 on: 5.5 + 6.5 + 7.5 + 8.5 + 9.5
        "auc": 3750.0,
        "level": 4.0,  # its own level before the cut
        "to_recover": None,
        "difference": 0.0,
        "difference_pct": 0.0,
    }
    # c1: 1 2 3 4 5 | 0 2 4 6 6, collapsed at step 500, reaches 4 at step 800
    assert rows["c1"]["params"] == 1000 and rows["c1"]["arm"] == "cosine"
    assert rows["c1"]["kept"] == 1000 / PARAMS and rows["c1"]["kl_mean"] == 0.01
    assert rows["c1"]["last_mean"] == pytest.approx(16 / 3)
    assert rows["c1"]["difference"] == pytest.approx(16 / 3 - 9)
    assert rows["c1"]["difference_pct"] == pytest.approx((16 / 3 - 9) / 9)
    assert rows["c1"]["auc"] == 100 * (2.5 + 1 + 3 + 5 + 6)
    assert rows["c1"]["to_recover"] == 300
    # b1 starts after the branch: 1 3 3 5 5 at steps 600..1000, reaches 4 at step 900
    assert rows["b1"]["params"] == 1200 and rows["b1"]["arm"] == "random_ablation"
    assert rows["b1"]["auc"] == 100 * (2 + 3 + 4 + 5)
    assert rows["b1"]["to_recover"] == 400

    assert table_row(text, "base")[:2] == ["base", "baseline"] and table_row(text, "base")[-1] == "-"
    kept = f"{1000 / PARAMS:.1%}"
    assert table_row(text, "c1") == [
        "c1",
        "cosine",
        kept,
        "1.0e-02",
        "2.0e-01",
        "5.333",
        "-3.667",
        "-40.7%",
        "1750",
        "300",
    ]
    assert "every measure from the cut" in text and "AUC over 500-1,000" in text
    for suffix in ("png", "svg"):
        assert (tmp_path / f"compare.{suffix}").stat().st_size > 0
    assert "<svg" in (tmp_path / "compare.svg").read_text()[:1000]


def test_compare_smooths_each_side_of_the_collapse_apart(
    train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    summary, _ = compare(train_dir, tmp_path, capsys, "c1", "b1", "--smooth", "2", "--baseline", "base")
    rows = {row["run"]: row for row in summary["runs"]}
    # --baseline adds the run; the first step after c1's collapse averages 0 alone, not with the 5 before it
    assert [row["run"] for row in summary["runs"]] == ["base", "c1", "b1"]
    assert summary["smooth"] == 2
    assert rows["c1"]["to_recover"] == 400  # smoothed 0 1 3 5 6
    assert rows["b1"]["to_recover"] == 400  # smoothed 1 2 3 4 5
    assert rows["c1"]["last_mean"] == pytest.approx(16 / 3)  # the table's means are of the raw values
    curve = learning_curve(load_run("c1", train_dir), "agent_step", "experience/rewards", 2)
    assert list(curve.smoothed) == [1, 1.5, 2.5, 3.5, 4.5, 0, 1, 3, 5, 6]


def test_a_scratch_run_is_measured_from_the_cut_like_the_branches(
    train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    summary, _ = compare(train_dir, tmp_path, capsys, "s1", "c1", "base")
    assert summary["collapse_x"] == 500 and summary["baseline"] == "base"
    scratch = summary["runs"][0]
    assert scratch["collapse_x"] == 500  # its step 0 placed at the cut
    assert scratch["to_recover"] == 800  # 0 0 1 1 2 2 3 4: reaches 4 after 800 steps of its own
    # the same span as the others, 500..1000: its first 5 epochs, 0 0 1 1 2 at 600..1000
    assert summary["auc_span"] == [500, 1000] and scratch["auc"] == 100 * (0 + 0.5 + 1 + 1.5)


def test_compare_against_wall_time(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    summary, text = compare(train_dir, tmp_path, capsys, "base", "c1", "--x", "wall_time")
    rows = {row["run"]: row for row in summary["runs"]}
    assert summary["collapse_x"] == 50.0
    assert rows["c1"]["to_recover"] == 30.0
    assert rows["c1"]["auc"] == 10 * (2.5 + 1 + 3 + 5 + 6)
    assert "to recover (s)" in text


def test_compare_without_a_baseline_says_why_it_has_no_recovery(
    train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    summary, text = compare(train_dir, tmp_path, capsys, "c1", "b1")
    assert summary["baseline"] is None and summary["baseline_before_collapse"] is None
    assert all(row["to_recover"] is None and row["difference"] is None for row in summary["runs"])
    assert "to recover" not in text and "vs baseline" not in text
    assert "note: no baseline (a run without a collapse, or --baseline)" in text


def test_a_mean_over_more_epochs_than_a_run_has_after_the_cut_says_so(
    train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    code, text, err = run_cli(capsys, "compare", "base", "c1", "--train-dir", str(train_dir), "--out", str(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert {row["run"]: row["last_mean"] for row in summary["runs"]} == {"base": 8.0, "c1": 3.6}  # epochs 6..10
    assert "note: c1: 5 epochs after the cut, fewer than --last 10: the mean is of those" in text


def test_seeds_of_one_arm_are_grouped_with_their_spread(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "runs"
    write_metrics(root / "base", {epoch: float(epoch) for epoch in range(1, 7)})
    for name, rewards in (("a0", [1, 2, 3, 2, 4, 6]), ("a1", [1, 2, 3, 4, 6, 8])):
        record = {"epoch": 3, "agent_step": 300, "mode": "fibration", "params_after": 500, "kl_mean": 0.1}
        write_metrics(root / name, {e: float(r) for e, r in enumerate(rewards, 1)}, record)
    summary, text = compare(root, tmp_path, capsys, "base", "a0", "a1", "--group")
    (baseline, arm) = summary["arms"]
    assert baseline["runs"] == ["base"] and arm["runs"] == ["a0", "a1"] and arm["arm"] == "cosine"
    assert arm["last_mean"] == pytest.approx(5.0) and arm["last_mean_std"] == pytest.approx(1.0)  # 4 and 6
    assert arm["to_recover"] == 100  # both reach the baseline's 2.0 (epochs 1..3) at their first step after the cut
    assert table_row(text, "cosine")[:2] == ["cosine", "2"] and "5 ± 1 (n=2)" in text
    one_run = next(line for line in text.splitlines() if line.split()[:2] == ["baseline", "1"])
    assert "5 (n=1)" in one_run and "±" not in one_run  # a spread of one run would read as precision


def test_grouped_arms_are_paired_with_their_own_seeds_baseline(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Seeds 0..2: the baseline's rewards are e + 10 s; each collapsed branch of seed s (cut at epoch 3) falls to
    10 s + 0, 1, 3 after it. Seed 3's branch has no baseline of its seed."""
    root = tmp_path / "runs"
    for seed in range(4):
        if seed < 3:
            write_metrics(root / f"base{seed}", {epoch: epoch + 10.0 * seed for epoch in range(1, 7)})
            (root / f"base{seed}" / "config.json").write_text(json.dumps({"seed": seed}))
        rewards = [1 + 10 * seed, 2 + 10 * seed, 3 + 10 * seed, 10 * seed, 1 + 10 * seed, 3 + 10 * seed]
        record = {"epoch": 3, "agent_step": 300, "mode": "fibration", "params_after": 500}
        write_metrics(root / f"c{seed}", {e: float(r) for e, r in enumerate(rewards, 1)}, record)
        (root / f"c{seed}" / "config.json").write_text(json.dumps({"seed": seed}))
    runs = ["base0", "base1", "base2", "c0", "c1", "c2", "c3"]
    summary, text = compare(root, tmp_path, capsys, *runs, "--group")
    baseline, arm = summary["arms"]
    assert baseline["runs"] == ["base0", "base1", "base2"] and arm["runs"] == ["c0", "c1", "c2", "c3"]
    # last 3 means 10 s + 4/3 against 10 s + 5: -11/3 on every seed that has a baseline, whatever the seeds' spread
    assert arm["paired"] == {
        "mean": pytest.approx(-11 / 3),
        "low": pytest.approx(-11 / 3),
        "high": pytest.approx(-11 / 3),
        "n": 3,
        "excludes_zero": True,
        "seeds": [0, 1, 2],
    }
    assert arm["last_mean_n"] == 4 and arm["difference_n"] == 3
    # each seed regains its own baseline's 10 s + 2 at the third epoch after the cut, seed 3 is dropped
    rows = {row["run"]: row for row in summary["runs"]}
    assert [rows[f"c{seed}"]["to_recover"] for seed in range(4)] == [300, 300, 300, None]
    assert rows["c3"]["level"] is None and arm["to_recover"] == 300 and arm["to_recover_n"] == 3
    assert "note: c3: no baseline run of its seed 3: no difference or recovery" in text
    row = " ".join(table_row(text, "cosine"))
    assert "-3.667 [-3.667, -3.667] (n=3) yes" in row  # the interval, and that it excludes 0
    assert "300 ± 0 (n=3)" in text and f"{4 / 3 + 15:.4g} ± " in text and "(n=4)" in text
    iqm = summary["rliable"]["iqm"]
    assert iqm["cosine"]["n"] == 4 and iqm["baseline"]["iqm"] == pytest.approx(15.0)
    assert summary["rliable"]["probability_of_improvement"][0]["x"] == "cosine"
    assert "interquartile mean of the last 3 mean over runs (rliable, 95% CI): baseline 15 [" in text


def one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_target_lists_the_runs(train_dir: Path, capsys: pytest.CaptureFixture):
    err = one_line_error(capsys, "analyze", "bsae", "--train-dir", str(train_dir))
    assert "'bsae'" in err and "runs there: b1, base, c1, s1" in err
    err = one_line_error(capsys, "compare", "base", "nope", "--train-dir", str(train_dir))
    assert "'nope'" in err and "b1, base, c1, s1" in err
    err = one_line_error(capsys, "analyze", "base", "--train-dir", str(train_dir / "missing"))
    assert "does not exist" in err


def test_run_without_checkpoints(train_dir: Path, capsys: pytest.CaptureFixture):
    err = one_line_error(capsys, "analyze", "c1", "--train-dir", str(train_dir))
    assert "run 'c1' has no checkpoints" in err


def test_unknown_metric_lists_the_logged_ones(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    err = one_line_error(
        capsys, "compare", "base", "c1", "--y", "reward", "--train-dir", str(train_dir), "--out", str(tmp_path)
    )
    assert "'reward'" in err and "experience/rewards" in err and "overview/sps" in err
    assert not (tmp_path / "compare.png").exists()


def test_invalid_threshold_names_the_option(train_dir: Path, capsys: pytest.CaptureFixture):
    err = one_line_error(capsys, "analyze", "base", "--train-dir", str(train_dir), "--lstm", "3")
    assert re.search(r"invalid --lstm 3\.0: .*less than or equal to 2", err)


def test_unreadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture):
    broken = tmp_path / "broken.pt"
    broken.write_text("not a checkpoint")
    err = one_line_error(capsys, "analyze", str(broken))
    assert "cannot read checkpoint" in err and "broken.pt" in err


def test_frontier_of_a_checkpoint_writes_every_arm_within_its_budget(tmp_path: Path, capsys: pytest.CaptureFixture):
    from metta_collapse.training.arena import make_small_arena, make_vecenv
    from metta_collapse.training.policy import make_policy

    vecenv = make_vecenv(make_small_arena(), 1)
    policy = make_policy(vecenv.driver_env)
    vecenv.close()
    path = save_checkpoint(tmp_path, "p", policy, torch.optim.Adam(policy.parameters()), 1, 1, 0.0, arena="small")
    argv = ["frontier", str(path), "--budgets", "0.5", "--seeds", "1", "--fit-steps", "1024", "--report-copies", "1"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "frontier.json").read_text())
    arms = {(row["units"], row["refit"]) for row in result["rows"] if row["budget"] == 0.5}
    assert arms == {(u, r) for u in ("basis", "cosine", "scale_aware") for r in (True, False)} | {
        ("random units (basis widths)", True)
    }
    at_budget = [row for row in result["rows"] if row["budget"] == 0.5]
    assert all(row["kept"] <= 0.5 for row in at_budget)
    by_arm = {(row["units"], row["refit"]): row for row in at_budget}
    for units in ("basis", "cosine", "scale_aware"):  # the plain arm reuses the knob the refitted one chose
        assert by_arm[units, False]["widths"] == by_arm[units, True]["widths"]
        assert by_arm[units, True]["kl_mean"] < by_arm[units, False]["kl_mean"]
    assert by_arm["random units (basis widths)", True]["widths"] == by_arm["basis", True]["widths"]
    assert result["data"]["agent_steps"]["report"] == 6 * 256 and (tmp_path / "out" / "frontier.png").stat().st_size
    assert result["data"]["maps"] == {"fit": 1, "select": 2, "report": 1}
    assert "random units (basis widths)" in capsys.readouterr().out
    assert main(["frontier", str(tmp_path / "missing.pt")]) == 2
    assert main([*argv, "--size", "macs", "--out", str(tmp_path / "macs")]) == 0  # the multiply-adds budgeted
    result = json.loads((tmp_path / "macs" / "frontier.json").read_text())
    at_budget = [row for row in result["rows"] if row["budget"] == 0.5]
    assert result["size"] == "macs" and len(at_budget) == 7 and all(row["macs_kept"] <= 0.5 for row in at_budget)
    assert "MACs kept" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["metta_collapse", "metta_collapse.cli"])
def test_python_dash_m_runs_the_command(module: str):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: metta-collapse" in done.stdout
    done = subprocess.run([sys.executable, "-m", module, "bogus"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_a_torn_last_metrics_line_is_dropped_and_any_other_bad_line_named(tmp_path: Path, capsys):
    from metta_collapse.training.metrics import read_metrics

    run = tmp_path / "torn"
    write_metrics(run, {1: 1.0, 2: 2.0, 3: 3.0})
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"metric/epoch": 4, "metric/ag')  # killed mid-write
    with pytest.warns(UserWarning, match="line 4 is torn"):
        assert [m["metric/epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "junk", *lines[1:3]]) + "\n")
    code, _, err = run_cli(capsys, "compare", "torn", "--train-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "metrics.jsonl, line 2: not a metrics record" in err


def test_compare_writes_strict_json_and_refuses_a_window_longer_than_the_runs(tmp_path: Path, capsys):
    write_metrics(tmp_path / "nan", {1: 1.0, 2: float("nan"), 3: 2.0})
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compare", "nan", "--train-dir", str(tmp_path), "--out", str(out), "--smooth", "4")
    assert code == 2 and "--smooth 4 is longer than the longest run (3 epochs)" in err
    code, _, err = run_cli(capsys, "compare", "nan", "--train-dir", str(tmp_path), "--out", str(out), "--last", "2")
    assert code == 0, err

    def refuse(constant: str) -> None:
        raise AssertionError(f"compare.json holds {constant}, which is not JSON")

    summary = json.loads((out / "compare.json").read_text(), parse_constant=refuse)
    assert summary["runs"][0]["last_mean"] is None
