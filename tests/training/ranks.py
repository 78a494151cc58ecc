"""Run a recipe as one torchrun process, recording after every epoch a digest of each replica (parameters and
optimizer state), gathered on rank 0 into the JSON-lines file $DIGESTS. With $FAIL_RANK set, the collapse fails
on that rank only, after it has rewritten everything (the test of a rollback on every rank).

    python -m torch.distributed.run --nproc-per-node=2 tests/training/ranks.py MODULE.FUNC key=value ...
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from metta_collapse import live  # noqa: E402
from metta_collapse.training import distributed  # noqa: E402
from metta_collapse.training.collapse import CollapseTrainTool  # noqa: E402
from metta_collapse.training.runner import main  # noqa: E402

collapse_at_epoch_end = CollapseTrainTool.on_epoch_end


def on_epoch_end(tool: CollapseTrainTool, state) -> None:  # noqa: ANN001
    collapse_at_epoch_end(tool, state)
    digests = live.gather(live.fingerprint(state.policy, state.optimizer))
    if distributed.is_main():
        with open(os.environ["DIGESTS"], "a") as file:
            file.write(json.dumps({"epoch": state.epoch, "digests": digests}) + "\n")


def broken(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected")


if __name__ == "__main__":
    CollapseTrainTool.on_epoch_end = on_epoch_end
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        live.behaviour_change = broken
    sys.exit(main(sys.argv[1:]))
