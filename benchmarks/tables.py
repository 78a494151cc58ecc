"""The README's measured tables, rendered from the result files under `benchmarks/results/`.

README.md holds each rendered table between two marker lines; the text after the renderer's name is its argument:

    <!-- table: frontier seed0_e40.json -->

    | budget | kept | ... |

    <!-- /table -->

    python benchmarks/tables.py            # rewrite the marked blocks in place, print which changed
    python benchmarks/tables.py --check    # exit 1, naming every block that differs from its rendering

A renderer is a function `(results_dir, *args) -> str` (a Markdown table) registered with `@renderer`; it reads
only JSON files under `results_dir`. Standard library only, so that the test needs neither torch nor mettagrid.
"""

import argparse
import inspect
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

START = re.compile(r"^(?P<indent>[ \t]*)<!-- table: (?P<name>\S+)(?P<args>(?: \S+)*) -->$")
END = re.compile(r"^[ \t]*<!-- /table -->$")

RENDERERS: dict[str, Callable[..., str]] = {}


class TableError(Exception):
    """A marked block that cannot be rendered: unknown renderer, missing or unreadable result file, bad markers."""


def renderer(function: Callable[..., str]) -> Callable[..., str]:
    RENDERERS[function.__name__] = function
    return function


def load(results_dir: Path, name: str) -> dict:
    path = results_dir / name
    if not path.is_file():
        raise TableError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TableError(f"{path} is not JSON: {error}") from None


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def pm(mean: float, std: float, form: str) -> str:
    return f"{mean:{form}} ± {std:{form.lstrip('+')}}"


@renderer
def collapse_arena(results_dir: Path) -> str:
    """The closed loop (`benchmarks/collapse_arena.py`): per arm, the seed means of its records and its reward."""
    result = load(results_dir, "collapse_arena.json")
    n = len(result["seeds"])
    header = ["arm", "kept", "KL mean", "value error", "collapse, s", f"reward after the cut (n = {n})"]
    header.append(f"− continuation (n = {n})")
    rows = []
    for arm, summary in result["summary"].items():
        mine = [r for r in result["rows"] if r["arm"] == arm]
        rows.append(
            [
                arm,
                f"{statistics.fmean(r['params_kept'] for r in mine):.1%}",
                f"{statistics.fmean(r['kl_mean'] for r in mine):.1e}",
                f"{statistics.fmean(r['value_err'] for r in mine):.3f}",
                f"{statistics.median(r['collapse_seconds'] for r in mine):.1f}",
                pm(summary["reward_mean"], summary["reward_std"], ".5f"),
                pm(summary["difference_mean"], summary["difference_std"], "+.5f"),
            ]
        )
    continuation = result["continuation"]
    rows.append(
        ["uncollapsed continuation", "100%", "", "", "", pm(continuation["mean"], continuation["std"], ".5f"), ""]
    )
    return markdown(header, rows)


@renderer
def collapse_time(results_dir: Path) -> str:
    """Wall time of a live collapse inside training (`benchmarks/collapse_time.py`), per setting."""
    results = load(results_dir, "collapse_time.json")["results"]
    n = max(len(r["seconds"]) for r in results.values())
    header = ["setting", "kept", f"collapse, s (median of {n})", "runs, s", "the record's evaluations, s"]
    header.append("torch threads")
    rows = [
        [
            label,
            f"{r['kept']:.1%}",
            f"{r['median_seconds']:.1f}",
            ", ".join(f"{s:.1f}" for s in r["seconds"]),
            f"{r['median_seconds_record']:.2f}",
            str(r["torch_threads"]),
        ]
        for label, r in results.items()
    ]
    return markdown(header, rows)


@renderer
def speed(results_dir: Path) -> str:
    """What a collapse saves in compute (`benchmarks/speed.py`): per policy its size, its latency alone and
    training's agent steps/s with the epoch's time split, medians, and each against before the collapse."""
    result = load(results_dir, "speed.json")
    results, batch = result["results"], result["latency_batch"]
    before = results["before"]
    n = min(r["epochs"] for r in results.values())
    header = ["policy", "parameters", "multiply-adds / agent step", f"latency alone, µs / agent step ({batch} agents)"]
    header += [f"training agent steps/s (median of ≥ {n} epochs)", "epoch, s: env / forward / update / other"]
    header.append("agent steps/s without the env")
    rows = []
    for label, r in results.items():
        split = " / ".join(f"{seconds:.2f}" for seconds in r["median_split_seconds"].values())
        rows.append(
            [
                label,
                f"{r['params']:,} ({r['params'] / before['params']:.1%})",
                f"{r['macs_per_step']:,} ({r['macs_per_step'] / before['macs_per_step']:.1%})",
                f"{r['latency_seconds'] * 1e6:.1f} (×{before['latency_seconds'] / r['latency_seconds']:.2f})",
                f"{r['median_sps']:,.0f} (×{r['median_sps'] / before['median_sps']:.2f})",
                f"{r['median_epoch_seconds']:.2f}: {split}",
                f"{r['ceiling_sps']:,.0f}",
            ]
        )
    return markdown(header, rows)


@renderer
def distributed(results_dir: Path) -> str:
    """Agent steps per second in 1 and N processes (`benchmarks/distributed.py`)."""
    result = load(results_dir, "distributed.json")
    n = max(len(runs) for runs in result["sps"].values())
    header = ["processes", f"agent steps/s (median of {n})", "runs", "× 1 process"]
    one = result["median"]["1"]
    rows = [
        [processes, f"{median:,.0f}", ", ".join(f"{s:,.0f}" for s in result["sps"][processes]), f"×{median / one:.2f}"]
        for processes, median in sorted(result["median"].items(), key=lambda item: int(item[0]))
    ]
    return markdown(header, rows)


@renderer
def frontier(results_dir: Path, name: str) -> str:
    """A frontier file (`metta-collapse frontier`): per budget (of the parameters, or of the multiply-adds with
    `--size macs`), the held-out KL mean / value error of every choice of units, refitted and plain, and of random
    units + refit at the basis's widths (median and min–max over its seeds), and random's median KL ÷ the basis +
    refit's."""
    result = load(results_dir, f"frontier/{name}")
    rows = [r for r in result["rows"] if r["budget"] is not None]
    randoms = [r for r in rows if r["units"].startswith("random")]
    units = list(dict.fromkeys(r["units"] for r in rows if r not in randoms))
    n = len({r["seed"] for r in randoms})
    macs = result.get("size") == "macs"
    header = ["budget.macs" if macs else "budget", "MACs kept (basis)" if macs else "kept (basis)"]
    header += [f"{u} {suffix}" for u in units for suffix in ("+ refit", "plain")]
    header += [f"random + refit, median of {n}", "random + refit, min–max", "random ÷ basis"]

    def cell(r: dict | None) -> str:
        return "–" if r is None else f"{r['kl_mean']:.1e} / {r['value_err']:.3f}"

    table = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        at = {(r["units"], r["refit"]): r for r in rows if r["budget"] == budget and r not in randoms}
        random = [r for r in randoms if r["budget"] == budget]
        basis = at.get(("basis", True))
        line = [f"{budget:g}", f"{(basis or [*at.values(), *random][0])['macs_kept' if macs else 'kept']:.1%}"]
        line += [cell(at.get((u, refit))) for u in units for refit in (True, False)]
        if random:
            kl, value = sorted(r["kl_mean"] for r in random), sorted(r["value_err"] for r in random)
            median_kl = statistics.median(kl)
            line += [
                f"{median_kl:.1e} / {statistics.median(value):.3f}",
                f"{kl[0]:.1e}–{kl[-1]:.1e} / {value[0]:.3f}–{value[-1]:.3f}",
                "–" if not (basis and basis["kl_mean"]) else f"{median_kl / basis['kl_mean']:.1f}×",
            ]
        else:
            line += ["–", "–", "–"]
        table.append(line)
    return markdown(header, table)


def interval(estimate: dict | None, form: str) -> str:
    """A paired difference as `mean [low, high]`; one seed gives no interval."""
    if estimate is None:
        return "–"
    if estimate["low"] is None:
        return f"{estimate['mean']:{form}} (n=1)"
    return f"{estimate['mean']:{form}} [{estimate['low']:{form}}, {estimate['high']:{form}}]"


def spread(entry: dict | None, form: str) -> str:
    if entry is None:
        return "–"
    return f"{entry['mean']:{form}}" + ("" if entry["n"] == 1 else f" ± {entry['std']:{form.lstrip('+')}}")


def excludes_zero(estimate: dict | None) -> str:
    return (
        "–" if estimate is None or estimate["excludes_zero"] is None else "yes" if estimate["excludes_zero"] else "no"
    )


@renderer
def validation(results_dir: Path) -> str:
    """The validation's arms: mean ± std over seeds, and each arm's paired difference from the baseline (mean of
    the per-seed differences, 95 % bootstrap interval over seeds)."""
    result = load(results_dir, "validation/validation.json")
    summary, paired = result["summary"], result["paired_differences"]
    header = ["arm", "parameters", "final reward", "Δ vs baseline", "held-out hearts at end", "Δ vs baseline"]
    header += ["held-out hearts at the cut", "agent steps to regain (seeds)"]
    table = []
    for arm, row in summary.items():
        versus = f"{arm} - baseline"
        regained = [r["steps_to_regain"] for r in result["runs"][arm] if r["steps_to_regain"] is not None]
        table.append(
            [
                arm,
                f"{row['params']['mean']:,.0f}",
                spread(row["final_reward"], ".4f"),
                interval(paired["final_reward"].get(versus), "+.4f"),
                spread(row["hearts_at_end"], ".2f"),
                interval(paired["hearts_at_end"].get(versus), "+.2f"),
                spread(row["hearts_at_cut"], ".2f"),
                "–"
                if arm in ("baseline", "scratch")
                else f"{statistics.median(regained):,.0f} ({len(regained)}/{len(result['runs'][arm])})"
                if regained
                else f"never (0/{len(result['runs'][arm])})",
            ]
        )
    return markdown(header, table)


@renderer
def validation_pairs(results_dir: Path) -> str:
    """Paired differences between arms (per seed, 95 % bootstrap interval over seeds) and rliable's probability of
    improvement, on the final training reward and the held-out hearts at the end."""
    result = load(results_dir, "validation/validation.json")
    paired, rliable = result["paired_differences"], result["rliable"]
    header = ["difference", "final reward", "excludes 0", "P(improvement)", "held-out hearts at end", "excludes 0"]
    table = []
    for pair in paired["final_reward"]:
        x, y = pair.split(" - ")
        improvement = next(
            (e for e in rliable["final_reward"]["probability_of_improvement"] if (e["x"], e["y"]) == (x, y)), None
        )
        reward, hearts = paired["final_reward"][pair], paired["hearts_at_end"][pair]
        table.append(
            [
                pair,
                interval(reward, "+.4f"),
                excludes_zero(reward),
                "–"
                if improvement is None
                else interval(
                    {"mean": improvement["probability"], "low": improvement["low"], "high": improvement["high"]}, ".2f"
                ),
                interval(hearts, "+.2f"),
                excludes_zero(hearts),
            ]
        )
    return markdown(header, table)


@renderer
def symmetry(results_dir: Path) -> str:
    """The kept fraction a collapse would have at each of the validation baselines' checkpoints."""
    over_training = load(results_dir, "validation/validation.json")["symmetry_over_training"]
    epochs = [row["epoch"] for row in next(iter(over_training.values()))]
    header = ["seed", *(f"cosine e{e}" for e in epochs), *(f"basis e{e}" for e in epochs)]
    table = [
        [seed, *(f"{r['kept_cosine']:.0%}" for r in rows), *(f"{r['kept_basis']:.0%}" for r in rows)]
        for seed, rows in over_training.items()
    ]
    return markdown(header, table)


def render(name: str, args: list[str], results_dir: Path = RESULTS) -> str:
    label = " ".join([name, *args])
    if name not in RENDERERS:
        raise TableError(f"table {label!r}: no renderer {name!r} (known: {', '.join(sorted(RENDERERS))})")
    wanted = list(inspect.signature(RENDERERS[name]).parameters)[1:]
    if len(args) != len(wanted):
        raise TableError(
            f"table {label!r}: {name} takes {len(wanted)} argument(s) ({' '.join(wanted)}), not {len(args)}"
        )
    try:
        return RENDERERS[name](results_dir, *args)
    except TableError as error:
        raise TableError(f"table {label!r}: {error}") from None
    except KeyError as error:
        raise TableError(f"table {label!r}: its result file has no field {error}") from None


def blocks(text: str) -> list[tuple[int, int, str, str, list[str]]]:
    """The marked blocks of a README: (start line, end line, indent, renderer, args), lines 0-based."""
    found, start = [], None
    for number, line in enumerate(text.splitlines()):
        if match := START.match(line):
            if start is not None:
                raise TableError(f"line {number + 1}: a table marker inside the block opened on line {start[0] + 1}")
            start = (number, match["indent"], match["name"], match["args"].split())
        elif END.match(line):
            if start is None:
                raise TableError(f"line {number + 1}: <!-- /table --> without an opening marker")
            found.append((start[0], number, *start[1:]))
            start = None
        elif "<!-- table" in line or "<!-- /table" in line:
            raise TableError(f"line {number + 1}: malformed table marker {line.strip()!r}")
    if start is not None:
        raise TableError(f"line {start[0] + 1}: table marker without <!-- /table -->")
    return found


def rewrite(text: str, results_dir: Path = RESULTS) -> tuple[str, list[str]]:
    """The README with every marked block rendered afresh, and the labels of the blocks that changed."""
    lines, changed, offset = text.splitlines(keepends=True), [], 0
    for start, end, indent, name, args in blocks(text):
        body = ["\n", *(f"{indent}{row}\n" for row in render(name, args, results_dir).splitlines()), "\n"]
        first, last = start + 1 + offset, end + offset
        if lines[first:last] != body:
            changed.append(" ".join([name, *args]))
            lines[first:last] = body
            offset += len(body) - (last - first)
    return "".join(lines), changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        text, changed = rewrite(args.readme.read_text(), args.results)
    except TableError as error:
        sys.exit(f"{args.readme}: {error}")
    if args.check:
        for label in changed:
            print(f"{args.readme}: table {label!r} differs from its rendering (run python benchmarks/tables.py)")
        sys.exit(1 if changed else 0)
    if changed:
        args.readme.write_text(text)
    print("\n".join(f"rewrote table {label!r}" for label in changed) or "every table is up to date")


if __name__ == "__main__":
    main()
