"""metta-collapse: shrink a policy network by fibration symmetry and keep training it."""

from metta_collapse.analysis import analyze
from metta_collapse.config import CollapseConfig, InputSpec, ModelSpec, Thresholds
from metta_collapse.errors import CollapseError
from metta_collapse.graph import Step, chain_graph
from metta_collapse.plan import CollapsePlan
from metta_collapse.rewrite import LSTMStack, ablate, collapse, map_state, reinitialize, remap_optimizer

__all__ = [
    "CollapseConfig",
    "CollapseError",
    "CollapsePlan",
    "InputSpec",
    "LSTMStack",
    "ModelSpec",
    "Step",
    "Thresholds",
    "ablate",
    "analyze",
    "chain_graph",
    "collapse",
    "map_state",
    "reinitialize",
    "remap_optimizer",
]
