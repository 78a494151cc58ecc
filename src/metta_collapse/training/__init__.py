"""Embedded training runtime: the arena task, the `fast` policy, PuffeRL glue, checkpoints and metrics."""

import logging

# PuffeRL imports torch's C++-extension helper, which logs a warning on every machine without CUDA
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
