"""metta-collapse: shrink a policy network by fibration symmetry and keep training it.

The public names are imported on first use (PEP 562), so that configuration and the command line's `--help` do not
load torch."""

import importlib

_HOMES = {
    "analysis": ["analyze", "known_barrier", "pass_colors", "per_channel", "register_rule"],
    "basis": ["select_basis"],
    "config": ["Budget", "CollapseConfig", "InputSpec", "ModelSpec", "RankTol", "Thresholds"],
    "errors": ["CollapseError"],
    "graph": ["Step", "chain_graph"],
    "plan": ["CollapsePlan"],
    "refitting": ["refit"],
    "rewrite": ["RecurrentStack", "ablate", "collapse", "keep", "map_state", "reinitialize", "remap_optimizer"],
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> object:
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    else:  # a submodule, e.g. `mc.config`
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
