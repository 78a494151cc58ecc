#!/usr/bin/env python3
"""Run a recipe: ./tools/run.py MODULE.FUNC [--args k=v ...] [--overrides a.b=c ...], or MODULE.FUNC k=v"""

import sys
from pathlib import Path

# this checkout's `experiments/` and `metta_collapse/`, used even when an older copy is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from metta_collapse.training.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
