"""Wall time of a live collapse inside training, with the runtime's own thread setting.

A trained small-arena checkpoint (`--checkpoint`, e.g. the epoch-40 one of `collapse_arena.small`) is resumed for
one epoch with `collapse.epoch_idx` at that epoch, so the collapse runs where it runs in a real run: at the end of
an epoch, on that epoch's experience. `seconds` (choosing the units, applying them, the refit, the optimizer and
recurrent-state maps) and `seconds_record` (measuring the record on the report part) come from the record; the
median of `--repeats` runs per setting is printed and written as JSON. Run it on an idle machine.

    python benchmarks/collapse_time.py --checkpoint train_dir/demo/checkpoints/demo__e40__...pt [--repeats 3]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout, even beside an installed copy

from experiments.recipes import collapse_arena  # noqa: E402
from metta_collapse.training.checkpoint import load_checkpoint  # noqa: E402
from metta_collapse.training.config import apply_override  # noqa: E402

SETTINGS = {"default knob": {}, "budget.params=0.25": {"collapse.budget.params": "0.25"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/collapse_time.json"))
    args = parser.parse_args()
    epoch = load_checkpoint(args.checkpoint)["epoch"]
    results = {}
    for label, overrides in SETTINGS.items():
        records = []
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as train_dir:
                run = f"t{repeat}"
                folder = Path(train_dir) / run / "checkpoints"
                folder.mkdir(parents=True)
                shutil.copy(args.checkpoint, folder / f"{run}__{args.checkpoint.name.split('__', 1)[1]}")
                tool = collapse_arena.small(run)
                for key, value in {
                    "train_dir": train_dir,
                    "wandb.enabled": "false",
                    "collapse.epoch_idx": str(epoch + 1),
                    "trainer.total_timesteps": str((epoch + 1) * tool.trainer.batch_size),
                    **overrides,
                }.items():
                    apply_override(tool, key, value)
                tool.invoke()
                records.append(json.loads((Path(train_dir) / run / "collapse.json").read_text()))
        results[label] = {
            "torch_threads": tool.torch_threads,
            "seconds": [r["seconds"] for r in records],
            "seconds_record": [r["seconds_record"] for r in records],
            "median_seconds": statistics.median(r["seconds"] for r in records),
            "median_seconds_record": statistics.median(r["seconds_record"] for r in records),
            "kept": records[0]["params_after"] / records[0]["params_before"],
        }
        print(
            f"{label}: collapse {results[label]['median_seconds']:.2f}s (median of {args.repeats}: "
            f"{', '.join(f'{s:.2f}' for s in results[label]['seconds'])}), record "
            f"{results[label]['median_seconds_record']:.2f}s, {results[label]['kept']:.1%} kept, "
            f"{tool.torch_threads} threads"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
