"""Networks with planted fibration symmetry: a random base network whose units are copied, with the input
columns of each copied unit split at random (differently in every row) so that the sums still balance."""

import numpy as np
import torch


def sizes(base: int, generator: np.random.Generator, largest: int = 4) -> np.ndarray:
    return generator.integers(1, largest + 1, size=base)


def owners(fiber_sizes: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Base unit of every expanded unit, in a shuffled order (fibers are not contiguous)."""
    return generator.permutation(np.repeat(np.arange(len(fiber_sizes)), fiber_sizes))


def expand(
    weight: torch.Tensor,
    out_owner: np.ndarray | None,
    in_owner: np.ndarray | None,
    generator: np.random.Generator,
    equal: bool = False,
) -> torch.Tensor:
    """Rows copied by `out_owner`; along dim 1 each base column spread over its copies with random fractions
    (different in every row), or `equal` ones: only then do gradients keep the symmetry during training."""
    w = weight.detach().double().numpy()
    if out_owner is not None:
        w = w[out_owner]
    if in_owner is not None:
        columns = w[:, in_owner]
        fractions = np.ones(columns.shape) if equal else generator.uniform(0.2, 1.0, size=columns.shape)
        totals = np.zeros((w.shape[0], w.shape[1], *w.shape[2:]))
        np.add.at(totals, (slice(None), in_owner), fractions)
        w = columns * fractions / totals[:, in_owner]
    return torch.tensor(w, dtype=weight.dtype)


def expand_rows(vector: torch.Tensor, owner: np.ndarray) -> torch.Tensor:
    return vector.detach()[torch.as_tensor(owner)].clone()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def gate_owner(owner: np.ndarray, base: int) -> np.ndarray:
    return np.concatenate([owner + gate * base for gate in range(4)])


def one_hot(labels, k: int | None = None) -> torch.Tensor:
    """S: the n x k 0/1 membership matrix of a partition."""
    labels = torch.as_tensor(np.asarray(labels))
    return torch.nn.functional.one_hot(labels, k or int(labels.max()) + 1).double()


def same_partition(a, b) -> bool:
    """Equal up to relabelling."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))
