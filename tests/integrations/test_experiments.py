"""This project's `experiments` package merges with Metta's instead of hiding it, however Metta is installed."""

import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# September 2025 Metta's `experiments` is a regular package that its editable install serves through an import hook
HOOK = """
import importlib.util, sys

class EditableHook:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "experiments":
            return importlib.util.spec_from_file_location(
                name, ROOT + "/experiments/__init__.py", submodule_search_locations=[ROOT + "/experiments"]
            )

sys.meta_path.append(EditableHook)
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def origins(root: Path, setup: str, modules: list[str]) -> dict[str, str]:
    """Where each module is found, in a fresh interpreter that sees this checkout and `root` only (no site-packages,
    so not the Metta installed here, if any: `experiments` needs the standard library alone)."""
    code = "\n".join(
        [
            f"import importlib.util, json, sys; sys.path.insert(0, {str(SRC)!r}); ROOT = {str(root)!r}",
            setup,
            f"print(json.dumps({{m: importlib.util.find_spec(m).origin for m in {modules!r}}}))",
        ]
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_metta_packages_behind_an_import_hook_keep_their_modules_and_win_on_shared_names(tmp_path: Path):
    write(
        tmp_path,
        {
            "experiments/__init__.py": "",
            "experiments/recipes/__init__.py": "",
            "experiments/recipes/arena_basic_easy_shaped.py": "",
            "experiments/evals/__init__.py": "",
            "experiments/evals/suite.py": "",
        },
    )
    found = origins(
        tmp_path,
        HOOK,
        [
            "experiments.recipes.arena_basic_easy_shaped",
            "experiments.evals.suite",
            "experiments.recipes.collapse_arena",
        ],
    )
    assert found == {
        "experiments.recipes.arena_basic_easy_shaped": str(tmp_path / "experiments/recipes/arena_basic_easy_shaped.py"),
        "experiments.evals.suite": str(tmp_path / "experiments/evals/suite.py"),
        "experiments.recipes.collapse_arena": str(SRC / "experiments/recipes/collapse_arena.py"),
    }


def test_a_metta_folder_on_the_path_merges_with_this_projects_recipes(tmp_path: Path):
    write(tmp_path, {"experiments/recipes/scratchpad/notes.py": ""})  # current Metta's root: a plain folder
    found = origins(
        tmp_path,
        "sys.path.insert(0, ROOT)",
        ["experiments.recipes.scratchpad.notes", "experiments.recipes.collapse_arena"],
    )
    assert found["experiments.recipes.scratchpad.notes"] == str(tmp_path / "experiments/recipes/scratchpad/notes.py")
    assert found["experiments.recipes.collapse_arena"] == str(SRC / "experiments/recipes/collapse_arena.py")
