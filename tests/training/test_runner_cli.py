import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_run import TINY

from metta_collapse.training import trainer
from metta_collapse.training.config import ConfigError
from metta_collapse.training.metrics import read_metrics
from metta_collapse.training.runner import build_tool, main

REPO = Path(__file__).resolve().parents[2]
RECIPE = "experiments.recipes.arena_basic_easy_shaped.train"
# the study's baseline command, verbatim
BASELINE = [
    "--args",
    "run='base'",
    "--overrides",
    "policy_architecture.name='fast'",
    "trainer.evaluation.evaluate_interval=0",
    "trainer.checkpoint.checkpoint_interval=10",
    "trainer.checkpoint.wandb_checkpoint_interval=10",
    "trainer.evaluation.replay_dir='base'",
    "trainer.evaluation.skip_git_check=true",
]


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "src"))


def test_both_syntaxes_build_the_same_tool():
    september = build_tool([RECIPE, *BASELINE, "trainer.total_timesteps=1000"])
    current = build_tool(
        [RECIPE, *[arg for arg in BASELINE if not arg.startswith("--")], "trainer.total_timesteps=1000"]
    )
    assert september.model_dump() == current.model_dump()
    assert september.run == "base"
    assert september.trainer.checkpoint.checkpoint_interval == 10
    assert september.trainer.evaluation.replay_dir == "base"
    assert september.trainer.evaluation.skip_git_check is True
    assert september.trainer.total_timesteps == 1000


def test_args_the_recipe_does_not_take_may_name_tool_fields():
    assert build_tool([RECIPE, "--args", "run=a", "seed=3"]).seed == 3
    with pytest.raises(ConfigError, match="unknown argument 'colour'"):
        build_tool([RECIPE, "--args", "colour=red"])


def test_unknown_override_names_the_key_and_the_valid_keys(capsys: pytest.CaptureFixture):
    assert main([RECIPE, "run=x", "trainer.checkpoint.interval=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:")
    assert "'trainer.checkpoint.interval'" in err
    assert "checkpoint_interval" in err and "wandb_checkpoint_interval" in err


def test_wrongly_typed_value_names_the_field(capsys: pytest.CaptureFixture):
    assert main([RECIPE, "run=x", "trainer.batch_size=lots"]) == 2
    err = capsys.readouterr().err
    assert "trainer.batch_size" in err and "'lots'" in err and "integer" in err


def test_batch_size_that_does_not_fit_the_agents_fails_before_any_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    def no_env(*args: object, **kwargs: object) -> None:
        raise AssertionError("an environment was started")

    monkeypatch.setattr(trainer, "make_vecenv", no_env)
    args = [
        RECIPE,
        "run=x",
        f"train_dir={tmp_path}",
        "trainer.batch_size=4096",
        "trainer.minibatch_size=1024",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trainer.batch_size=4096" in err and "24 agents" in err and "1536" in err
    assert not (tmp_path / "x").exists()


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_error_is_one_line_without_traceback(tmp_path: Path):
    result = run_cli([RECIPE, "run=x", "trainer.bogus=1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "trainer.bogus" in result.stderr


def test_baseline_command_runs_verbatim(tmp_path: Path):
    result = run_cli([RECIPE, *BASELINE, "trainer.total_timesteps=1000"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parameters" in result.stdout
    run_dir = tmp_path / "train_dir" / "base"
    checkpoints = list((run_dir / "checkpoints").glob("base__e1__s24576__t*__sc0.pt"))
    assert len(checkpoints) == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run=a", "seed=3", "seed=4"], "seed is given twice"),
        (["--args", "run=a", "--overrides", "run=b"], "run is given twice"),
        (["run="], "invalid value for run: ''"),
        (["run=a b"], "invalid value for run: 'a b'"),
        (["run=../x"], "invalid value for run: '../x'"),
        (["run=.."], "invalid value for run: '..'"),
        (["run=a", f"seed={2**32}"], "invalid value for seed"),
        (["run=a", "seed=-1"], "invalid value for seed"),
    ],
)
def test_bad_command_lines_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture):
    assert main([RECIPE, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and message in err


def test_settings_that_cannot_run_are_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture):
    recipe = "experiments.recipes.collapse_arena.small"
    argv = [recipe, "run=a", f"train_dir={tmp_path}", "collapse.enabled=false", "collapse.init_from=base"]
    assert main(argv) == 2
    assert "collapse.init_from=base branches with a collapse, but collapse.enabled=false" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert main([recipe, "run=a", f"train_dir={tmp_path}", "device=cuda"]) == 2
        assert "device=cuda, but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_one_training_job_per_run_and_a_dead_holders_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture):
    from metta_collapse.training.config import run_lock

    lock = tmp_path / "a" / "run.lock"
    lock.parent.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(str(other.pid))
        argv = ["experiments.recipes.collapse_arena.small", "run=a", f"train_dir={tmp_path}"]
        assert main(argv) == 2
        assert f"run 'a' is being trained by process {other.pid}" in capsys.readouterr().err
        assert not (tmp_path / "a" / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of process {other.pid}"), run_lock(lock.parent):
        assert lock.read_text() == str(os.getpid())
        with run_lock(lock.parent):  # the same process again: a branch's job, then its training
            pass
        assert lock.exists()
    assert not lock.exists()


def test_help_explains_the_runner_and_lists_a_recipes_override_paths(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--help"]) == 0
    assert "MODULE.FUNC" in capsys.readouterr().out
    recipe = "experiments.recipes.collapse_arena.small"
    assert main([recipe, "collapse.epoch_idx=7", f"train_dir={tmp_path}", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  collapse.epoch_idx = 7  (>= 0)" in lines  # the recipe's tool with the command line's overrides
    assert "  collapse.budget.params = null  (> 0.0; <= 1.0)" in lines
    assert '  collapse.mode = "fibration"  (one of fibration, random_ablation, scratch)' in lines
    assert "  trainer.batch_size = 12288  (> 0)" in lines and not any(tmp_path.iterdir())  # nothing ran


def test_help_and_argument_errors_answer_without_importing_the_runtime():
    """What keeps `tools/run.py MODULE.FUNC --help` and a refused override fast: no torch, mettagrid, wandb or
    PufferLib is imported before the tool runs."""
    heavy = ("torch", "mettagrid", "wandb", "pufferlib")
    script = (
        "import sys\n"
        "from metta_collapse.training.runner import main\n"
        f"assert main([{'experiments.recipes.collapse_arena.train'!r}, '--help']) == 0\n"
        f"assert main([{'experiments.recipes.collapse_arena.sweep'!r}, '--help']) == 0\n"
        f"assert main([{'experiments.recipes.collapse_arena.small'!r}, 'collapse.thresholds.lstm=3']) == 2\n"
        f"print('LOADED', sorted(name for name in {heavy!r} if name in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "collapse.thresholds.lstm" in done.stderr and "LOADED []" in done.stdout


def test_a_run_writes_its_settings_and_a_resume_names_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture):
    command = [RECIPE, "run=r", f"train_dir={tmp_path}", "wandb.enabled=false", *(f"{k}={v}" for k, v in TINY.items())]
    assert main([*command, "trainer.total_timesteps=384"]) == 0
    settings = json.loads((tmp_path / "r" / "config.json").read_text())
    assert settings["trainer"]["batch_size"] == 384 and settings["training_env"]["arena"] == "small"
    capsys.readouterr()
    assert main([*command, "trainer.total_timesteps=768"]) == 0
    assert "r resumes with other settings than it last trained with: trainer.total_timesteps 384 -> 768" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "r" / "config.json").read_text())["trainer"]["total_timesteps"] == 768


def test_a_branch_takes_its_sources_settings_with_the_command_lines_on_top(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    tiny = [f"{key}={value}" for key, value in TINY.items()]
    baseline = [f"train_dir={tmp_path}", "wandb.enabled=false", "trainer.checkpoint.checkpoint_interval=1", *tiny]
    assert main([RECIPE, "run=base", "trainer.total_timesteps=768", *baseline]) == 0
    capsys.readouterr()
    branch = ["collapse.init_from=base", "collapse.epoch_idx=1", "collapse.fit_steps=1024", "seed=3"]
    assert main(["experiments.recipes.collapse_arena.train", "run=b", f"train_dir={tmp_path}", *branch]) == 0
    out = capsys.readouterr().out
    assert "the branch takes the settings of run 'base': " in out and "trainer.batch_size=384" in out
    assert "resuming" not in out
    assert out.index("branching b from base at its epoch 1") < out.index("collapse (") < out.index("run b in ")
    settings = json.loads((tmp_path / "b" / "config.json").read_text())
    assert settings["trainer"]["batch_size"] == 384 and settings["trainer"]["total_timesteps"] == 768
    assert settings["wandb"]["enabled"] is False and settings["seed"] == 3  # the source's; the command line's
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[-1]["metric/agent_step"] == 768
