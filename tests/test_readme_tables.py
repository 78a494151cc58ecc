"""The README's measured tables are what `benchmarks/tables.py` renders from `benchmarks/results/`, so a figure
cannot drift from its result file. Standard library only: no torch or mettagrid import."""

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tables.py"
spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)

README = (ROOT / "README.md").read_text()


def labels(text: str) -> list[str]:
    return [" ".join([name, *args]) for _, _, _, name, args in tables.blocks(text)]


def script(*args: str, readme: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--readme", str(readme)] if readme else []
    return subprocess.run([sys.executable, str(SCRIPT), *extra, *args], capture_output=True, text=True, timeout=60)


def test_every_marked_table_in_the_readme_is_its_rendering():
    assert {"collapse_arena", "collapse_time", "distributed", "frontier seed0_e40.json", "speed"} <= set(labels(README))
    text, changed = tables.rewrite(README)
    assert changed == [], f"README tables differ from their result files: {changed}; run python benchmarks/tables.py"
    assert text == README


def test_a_number_edited_by_hand_inside_a_block_is_caught():
    lines = README.splitlines(keepends=True)
    for start, end, _, name, args in tables.blocks(README):
        edited = list(lines)
        row = start + 4  # the marker, a blank line, the header, the separator: the first data row
        assert start < row < end and re.search(r"\d", edited[row]), (name, edited[row])
        edited[row] = re.sub(r"\d", lambda m: str((int(m[0]) + 1) % 10), edited[row], count=1)
        text, changed = tables.rewrite("".join(edited))
        assert changed == [" ".join([name, *args])]
        assert text == README  # the rewrite puts the rendered figure back


def test_check_exits_1_naming_the_block_that_differs(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README.replace("| 2 | 6,656 |", "| 2 | 6,657 |", 1))
    assert readme.read_text() != README
    result = script("--check", readme=readme)
    assert result.returncode == 1 and "'distributed' differs" in result.stdout
    assert readme.read_text() != README  # --check changes nothing
    result = script(readme=readme)
    assert result.returncode == 0 and "rewrote table 'distributed'" in result.stdout
    assert readme.read_text() == README
    assert script("--check", readme=readme).returncode == 0


def scale_floats(value, factor: float):
    if isinstance(value, float):
        return value * factor
    if isinstance(value, dict):
        return {key: scale_floats(item, factor) for key, item in value.items()}
    if isinstance(value, list):
        return [scale_floats(item, factor) for item in value]
    return value


def test_every_renderer_reads_its_result_file(tmp_path: Path):
    results = tmp_path / "results"
    shutil.copytree(tables.RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    before = {label: tables.render(label.split()[0], label.split()[1:], results) for label in labels(README)}
    for path in results.rglob("*.json"):
        path.write_text(json.dumps(scale_floats(json.loads(path.read_text()), 1.5)))
    for label, table in before.items():
        assert tables.render(label.split()[0], label.split()[1:], results) != table, label

    # one number: the closed loop's default arm, seed 0, KL mean -> its row's KL cell, and nothing else
    path = results / "collapse_arena.json"
    shutil.copy(tables.RESULTS / "collapse_arena.json", path)
    original = tables.render("collapse_arena", [], results)
    result = json.loads(path.read_text())
    first = next(r for r in result["rows"] if r["arm"] == "default units + refit")
    first["kl_mean"] += 3e-3
    path.write_text(json.dumps(result))
    after = tables.render("collapse_arena", [], results).splitlines()
    changed = [(a, b) for a, b in zip(original.splitlines(), after, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("| default units + refit |")
    kl = statistics.fmean(r["kl_mean"] for r in result["rows"] if r["arm"] == "default units + refit")
    assert f"| {kl:.1e} |" in changed[0][1]  # the seed mean, the changed seed's KL in it


def test_the_frontier_takes_whatever_budgets_and_units_its_file_has(tmp_path: Path):
    def row(units, refit, budget, kl, value, seed=None):
        return {"units": units, "refit": refit, "budget": budget, "seed": seed, "kept": 0.3712, "kl_mean": kl,
                "kl_max": kl, "value_err": value, "top1": 1.0, "widths": {}, "hearts": 1.0}  # fmt: skip

    rows = [
        row("basis (default rank_tol)", True, None, 9.0, 9.0),
        row("basis", True, 0.37, 2e-6, 0.004),
        row("basis", False, 0.37, 1e-3, 0.3),
        row("exact", True, 0.37, 5e-5, 0.02),
        *(
            row("random units (basis widths)", True, 0.37, kl, 0.01 * s, s)
            for s, kl in enumerate([8e-5, 2e-5, 6e-4, 1e-4])
        ),
    ]
    (tmp_path / "frontier").mkdir()
    (tmp_path / "frontier" / "new.json").write_text(json.dumps({"sha256": "x", "rows": rows}))
    table = tables.render("frontier", ["new.json"], tmp_path).splitlines()
    assert table[0] == (
        "| budget | kept (basis) | basis + refit | basis plain | exact + refit | exact plain "
        "| random + refit, median of 4 | random + refit, min–max | random ÷ basis |"
    )
    assert len(table) == 3  # header, separator, the one budget
    assert table[2] == (
        "| 0.37 | 37.1% | 2.0e-06 / 0.004 | 1.0e-03 / 0.300 | 5.0e-05 / 0.020 | – "
        "| 9.0e-05 / 0.015 | 2.0e-05–6.0e-04 / 0.000–0.030 | 45.0× |"
    )


@pytest.mark.parametrize(
    "block, results, message",
    [
        ("<!-- table: nosuch -->\n<!-- /table -->\n", None, "no renderer 'nosuch'"),
        ("<!-- table: frontier nosuch.json -->\n<!-- /table -->\n", None, "nosuch.json does not exist"),
        ("<!-- table: frontier -->\n<!-- /table -->\n", None, "frontier takes 1 argument(s) (name), not 0"),
        ("<!-- table: distributed -->\n<!-- /table -->\n", "empty", "distributed.json does not exist"),
        ("<!-- table: distributed -->\n", None, "without <!-- /table -->"),
        ("text\n  <!-- /table -->\n", None, "without an opening marker"),
        ("<!-- table: distributed-->\n<!-- /table -->\n", None, "malformed table marker"),
    ],
)
def test_a_bad_marker_or_a_missing_file_is_a_clear_error(tmp_path: Path, block: str, results, message: str):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{block}")
    extra = ["--results", str(tmp_path / results)] if results else []
    if results:
        (tmp_path / results).mkdir()
    for args in ([], ["--check"]):
        result = script(*args, *extra, readme=readme)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert readme.read_text() == f"# title\n\n{block}"


def test_tables_imports_only_the_standard_library():
    # -S: no site-packages at all, so any import outside the standard library fails
    code = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import tables; print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modules = {name.split(".")[0] for name in eval(result.stdout)}
    assert modules - set(sys.stdlib_module_names) - {"tables", "__main__"} == set()
