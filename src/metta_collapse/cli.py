"""`metta-collapse analyze|frontier|compare`: symmetry of a checkpoint or over a run's training; the size/behaviour
frontier of a checkpoint; learning curves of runs.

metta-collapse analyze train_dir/base/checkpoints/base__e300__s...__sc0.pt --lstm 1.0
metta-collapse analyze base --every 10            # writes train_dir/base/symmetry.json and symmetry.png
metta-collapse frontier train_dir/base/checkpoints/base__e40__s...__sc0.pt --out plots/
metta-collapse compare base c1 c1_ablation --smooth 20 --out plots/
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metta_collapse.config import CollapseConfig


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"each budget must be in (0, 1], got {text!r}")
    return values


def finite(value: object) -> object:
    """`value` with NaN and infinities as None: JSON has no NaN (Python would write a bare `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metta-collapse", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="what a collapse would keep: per layer for a checkpoint, over training for a run",
        description="For a checkpoint (.pt), the per-layer widths a collapse would give and the fraction of "
        "parameters kept. For a run (a name under --train-dir or a run directory), the same at its checkpoints: "
        "the symmetry-over-training curve, written as symmetry.json and symmetry.png.",
    )
    analyze.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    analyze.add_argument("--train-dir", type=Path, default=Path("train_dir"), help="default: ./train_dir")
    from metta_collapse.config import Thresholds  # pydantic only: no torch for `--help`

    thresholds = Thresholds.model_fields
    for name in thresholds:
        analyze.add_argument(
            f"--{name}", type=float, help=f"{name} threshold in [0, 2] (default {thresholds[name].default})"
        )
    analyze.add_argument(
        "--metric",
        type=lambda text: text.replace("-", "_"),
        choices=["cosine", "exact", "scale_aware"],
        help="default: cosine",
    )
    analyze.add_argument("--tolerance", type=float, help="relative tolerance of the exact metric (default 1e-4)")
    analyze.add_argument("--strict", action="store_true", help="fail on operations the engine does not support")
    analyze.add_argument("--json", action="store_true", help="print JSON instead of the table")
    analyze.add_argument("--every", type=positive_int, default=1, help="for a run: every Nth checkpoint (and the last)")
    analyze.add_argument("--out", type=Path, help="for a run: output folder (default: the run directory)")
    analyze.set_defaults(handler=run_analyze)

    frontier = commands.add_parser(
        "frontier",
        help="behaviour change against size for each choice of units, plain and refitted: to choose a budget",
        description="Rolls a checkpoint's policy out in its arena (fit, select and report parts on different maps), "
        "collapses copies of it at each budget (of --size) with each choice of units, plain and with the refit, and "
        "random units + refit at the basis's widths, and measures each on the report part: whole episodes from "
        "zero state. Prints the table, writes frontier.json and frontier.png.",
    )
    frontier.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    frontier.add_argument("--arena", choices=["small", "full"], help="default: the one the checkpoint records")
    frontier.add_argument(
        "--budgets",
        type=fractions,
        default="0.9,0.6,0.45,0.3,0.2,0.15",
        help="kept fractions of --size, comma-separated (default 0.9,0.6,0.45,0.3,0.2,0.15)",
    )
    frontier.add_argument(
        "--size",
        choices=["params", "macs"],
        default="params",
        help="what a budget keeps a fraction of: the parameters (budget.params, default) or the multiply-adds per "
        "agent step (budget.macs)",
    )
    frontier.add_argument("--seeds", type=positive_int, default=3, help="random units + refit: seeds (default 3)")
    frontier.add_argument("--fit-steps", type=positive_int, default=6144, help="agent steps to fit on (default 6144)")
    frontier.add_argument("--report-copies", type=positive_int, default=4, help="environment copies (default 4)")
    frontier.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current directory)")
    frontier.set_defaults(handler=run_frontier)

    compare = commands.add_parser(
        "compare",
        help="learning curves of runs on one figure, with a summary table",
        description="Plots a logged metric of the runs against agent steps or wall time, marks each collapse, "
        "and tabulates parameters, the mean over the last epochs, the area under the curve after the collapse and "
        "how long after it the run reaches the baseline's level before the collapse. Writes compare.png, "
        "compare.svg and compare.json.",
    )
    compare.add_argument("runs", metavar="RUN", nargs="+", help="run names under --train-dir, or run directories")
    compare.add_argument("--train-dir", type=Path, default=Path("train_dir"), help="default: ./train_dir")
    compare.add_argument("--x", choices=["agent_step", "wall_time"], default="agent_step")
    compare.add_argument("--y", default="experience/rewards", help="a logged metric (default: experience/rewards)")
    compare.add_argument("--smooth", type=positive_int, default=1, metavar="W", help="moving-average window (epochs)")
    compare.add_argument("--last", type=positive_int, default=10, metavar="K", help="epochs averaged (default 10)")
    compare.add_argument("--baseline", metavar="RUN", help="default: the first run without a collapse")
    compare.add_argument("--group", action="store_true", help="summarise the runs of each arm (seeds) together")
    compare.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current directory)")
    compare.set_defaults(handler=run_compare)
    return parser


def collapse_config(args: argparse.Namespace) -> "CollapseConfig":
    from pydantic import ValidationError

    import metta_collapse as mc
    from metta_collapse.training.config import ConfigError

    try:
        thresholds = {name: getattr(args, name) for name in mc.Thresholds.model_fields}
        options = {"metric": args.metric, "tolerance": args.tolerance}
        return mc.CollapseConfig(
            thresholds=mc.Thresholds(**{name: value for name, value in thresholds.items() if value is not None}),
            strict=args.strict,
            **{name: value for name, value in options.items() if value is not None},
        )
    except ValidationError as error:
        problem = error.errors()[0]
        raise ConfigError(f"invalid --{problem['loc'][-1]} {problem['input']!r}: {problem['msg']}") from None


def run_analyze(args: argparse.Namespace) -> None:
    from metta_collapse.training import report

    config = collapse_config(args)
    path = Path(args.target)
    if path.is_file():
        checkpoint, plan = report.analyze_checkpoint(path, config)
        if args.json:
            print(plan.to_json())
            return
        print(
            f"{path.name}: run {checkpoint['run']}, epoch {checkpoint['epoch']}, agent step {checkpoint['agent_step']}"
            f", {report.checkpoint_state(checkpoint)}"
        )
        print(plan.table())
        print(
            f"a collapse ({report.describe_config(config)}) would keep {plan.kept_fraction:.1%} of the parameters "
            f"({plan.params_before} -> {plan.params_after})"
        )
        return
    run_dir = report.find_run(args.target, args.train_dir)

    def progress(checkpoint: Path, done: int, total: int) -> None:
        print(f"analysed {checkpoint.name} ({done}/{total})", file=sys.stderr)

    curve = report.symmetry_curve(run_dir, config, args.every, progress)
    out = args.out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "symmetry.json").write_text(json.dumps(curve, indent=1) + "\n")
    report.plot_symmetry(curve).savefig(out / "symmetry.png", dpi=120)
    if args.json:
        print(json.dumps(curve))
        return
    print(f"run {curve['run']}: what a collapse ({report.describe_config(config)}) would keep")
    print(report.symmetry_table(curve))
    print(f"wrote {out / 'symmetry.json'} and {out / 'symmetry.png'}")


def run_frontier(args: argparse.Namespace) -> None:
    from metta_collapse.training import frontier
    from metta_collapse.training.config import ConfigError

    if not args.checkpoint.is_file():
        raise ConfigError(f"no checkpoint file {args.checkpoint}")
    result = frontier.frontier(
        args.checkpoint,
        args.arena,
        args.budgets,  # argparse converts the string default with `type` too
        random_seeds=args.seeds,
        fit_steps=args.fit_steps,
        report_copies=args.report_copies,
        progress=lambda line: print(line, file=sys.stderr),
        size=args.size,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    frontier.plot_frontier(result).savefig(args.out / "frontier.png", dpi=120)
    print(f"{args.checkpoint.name} (sha256 {result['sha256'][:16]}...), held-out: {result['report']}")
    print(frontier.frontier_table(result))
    print(f"wrote {args.out / 'frontier.json'} and {args.out / 'frontier.png'}")


def run_compare(args: argparse.Namespace) -> None:
    from metta_collapse.training import report

    runs = [report.load_run(target, args.train_dir) for target in args.runs]
    if args.baseline is not None and args.baseline not in [run.name for run in runs]:
        runs.insert(0, report.load_run(args.baseline, args.train_dir))
        args.baseline = runs[0].name
    longest = max(len(run.metrics) for run in runs)
    if args.smooth > longest:
        raise report.ConfigError(f"--smooth {args.smooth} is longer than the longest run ({longest} epochs)")
    curves = [report.learning_curve(run, args.x, args.y, args.smooth) for run in runs]
    summary = report.compare_summary(runs, curves, args.x, args.y, args.last, args.baseline, args.group)
    summary["smooth"] = args.smooth
    figure = report.plot_compare(curves, summary, args.smooth)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        figure.savefig(args.out / f"compare.{suffix}", dpi=120)
    (args.out / "compare.json").write_text(json.dumps(finite(summary), indent=1) + "\n")
    print(report.compare_table(summary))
    print(f"wrote {', '.join(str(args.out / f'compare.{suffix}') for suffix in ('png', 'svg', 'json'))}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # imported here, as the reports are in the handlers: `--help` needs neither torch nor the training extras
        from metta_collapse.training.config import ConfigError
    except ModuleNotFoundError as error:
        print(
            f"error: {error.name} is not installed; reports need: pip install 'metta-collapse[train]'", file=sys.stderr
        )
        return 2
    try:
        args.handler(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
