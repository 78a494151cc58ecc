"""Adapters that run the collapse inside other trainers; each imports its trainer lazily. Which of Metta's eras is
installed is answered here, without importing torch or Metta (recipes ask it at import time)."""

import importlib.util
from typing import Literal

Era = Literal["current", "september"]


def detect_era() -> Era | None:
    """`current` (trainer components, a8d1ece), `september` (losses, b712df1), or None without Metta."""
    for era, module in (("current", "metta.rl.training.component"), ("september", "metta.rl.loss.base_loss")):
        try:
            if importlib.util.find_spec(module) is not None:
                return era
        except ImportError:  # no `metta`, or the unrelated PyPI package of that name
            continue
    return None
