"""metta-collapse: shrink a policy network by fibration symmetry and keep training it."""

from metta_collapse.analysis import analyze, known_barrier, pass_colors, per_channel, register_rule
from metta_collapse.basis import select_basis
from metta_collapse.config import Budget, CollapseConfig, InputSpec, ModelSpec, RankTol, Thresholds
from metta_collapse.errors import CollapseError
from metta_collapse.graph import Step, chain_graph
from metta_collapse.plan import CollapsePlan
from metta_collapse.refit import refit
from metta_collapse.rewrite import RecurrentStack, ablate, collapse, keep, map_state, reinitialize, remap_optimizer

__all__ = [
    "Budget",
    "CollapseConfig",
    "CollapseError",
    "CollapsePlan",
    "InputSpec",
    "RecurrentStack",
    "ModelSpec",
    "RankTol",
    "Step",
    "Thresholds",
    "ablate",
    "analyze",
    "known_barrier",
    "pass_colors",
    "per_channel",
    "register_rule",
    "chain_graph",
    "collapse",
    "keep",
    "map_state",
    "refit",
    "reinitialize",
    "remap_optimizer",
    "select_basis",
]
