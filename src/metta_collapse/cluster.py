"""Partitions of one layer's units from their aggregated input rows v_i (fibration.md §3)."""

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import pdist

from metta_collapse.errors import CollapseError

# Average linkage runs per connected component of the graph of pairs closer than t, which is exact: a merge
# at height <= t joins clusters whose average distance is <= t, so they hold a pair at distance <= t. The
# study's full distance matrix is then only built per component, up to this many units (about 1 GiB).
COMPONENT_LIMIT = 16384
BLOCK = 1024


def canonical(*labelings: np.ndarray) -> np.ndarray:
    """The common refinement of several labelings, numbered 0..k-1 in order of first occurrence."""
    code = np.zeros(len(np.asarray(labelings[0]).ravel()), dtype=np.int64)
    for labels in labelings:  # fold one labeling at a time: codes stay below n**2
        labels = np.asarray(labels, dtype=np.int64).ravel()
        code = np.unique(code * (labels.max(initial=0) + 1) + labels, return_inverse=True)[1].ravel()
    if len(code) == 0:
        return code
    first = np.full(code.max() + 1, len(code))
    np.minimum.at(first, code, np.arange(len(code)))
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[code]


def count(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if len(labels) else 0


def exact_partition(rows: np.ndarray, tolerance: float) -> np.ndarray:
    """Group rows equal within `tolerance` relative to the larger row's max-norm.

    Rows of one fiber have nearly equal random projections: sorted by the first projection, each row is
    compared only with neighbours inside the window that tolerance allows, pairs outside the window of any
    other projection are dropped, the rest are verified on full rows, and union-find joins them."""
    rows = np.asarray(rows, dtype=np.float64)
    n = len(rows)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    directions = np.random.default_rng(0).standard_normal((rows.shape[1], 4))
    projections = rows @ directions
    # rows with identical projections differ by less than float64 resolves: merge them before the window
    # search, which would otherwise compare every pair of a large fiber (dead units, say)
    projections, first, inverse = np.unique(projections, axis=0, return_index=True, return_inverse=True)
    rows, inverse = rows[first], inverse.ravel()
    m = len(rows)
    scale = np.abs(rows).max(axis=1)
    # |(vi - vj) . r| <= |r|_1 |vi - vj|_inf <= |r|_1 * tolerance * max scale
    windows = np.abs(directions).sum(axis=0) * tolerance * scale.max()
    order = np.argsort(projections[:, 0], kind="stable")
    projections = projections[order]
    sources, targets = [np.arange(m)], [np.arange(m)]
    active = np.arange(m)  # rows whose window still reaches further: gaps only grow with the offset
    for offset in range(1, m):
        active = active[active + offset < m]
        active = active[projections[active + offset, 0] - projections[active, 0] <= windows[0]]
        if active.size == 0:
            break
        gaps = np.abs(projections[active + offset, 1:] - projections[active, 1:])
        near = active[(gaps <= windows[1:]).all(axis=1)]
        i, j = order[near], order[near + offset]
        close = np.abs(rows[i] - rows[j]).max(axis=1) <= tolerance * np.maximum(scale[i], scale[j])
        sources.append(i[close])
        targets.append(j[close])
    groups = _components(m, np.concatenate(sources), np.concatenate(targets))
    return canonical(groups[inverse])


def _components(n: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _distances(block: np.ndarray, rows: np.ndarray, norms_block: np.ndarray, norms: np.ndarray, metric: str):
    dots = block @ rows.T
    if metric == "cosine":
        safe = lambda x: np.where(x > 0, x, 1.0)  # noqa: E731 - zero rows normalise to zero
        distance = 1.0 - dots / safe(norms_block)[:, None] / safe(norms)[None, :]
    else:
        squared = norms_block[:, None] ** 2 + norms[None, :] ** 2 - 2.0 * dots
        total = norms_block[:, None] + norms[None, :]
        distance = 2.0 * np.sqrt(np.maximum(squared, 0.0)) / np.where(total > 0, total, 1.0)
    return np.clip(distance, 0.0, 2.0)


def _condensed_distances(rows: np.ndarray, metric: str) -> np.ndarray:
    """Pairwise distances in scipy's condensed order, clamped to [0, 2] (float rounding can exceed 2)."""
    if metric == "cosine":
        distances = np.nan_to_num(pdist(rows, "cosine"), nan=1.0)  # a zero row normalises to zero
    else:
        distances = pdist(rows, "euclidean")
        norms = np.linalg.norm(rows, axis=1)
        start = 0
        for i in range(len(rows) - 1):  # row i's pairs (i, j > i) are one contiguous run
            stop = start + len(rows) - i - 1
            total = norms[i] + norms[i + 1 :]
            distances[start:stop] = 2.0 * distances[start:stop] / np.where(total > 0, total, 1.0)
            start = stop
    return np.clip(distances, 0.0, 2.0, out=distances)


def _average_linkage(rows: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    tree = linkage(_condensed_distances(rows, metric), method="average")
    return fcluster(tree, t=threshold, criterion="distance") - 1


def linkage_partition(rows: np.ndarray, threshold: float, metric: str, component_limit: int = COMPONENT_LIMIT):
    """Average-linkage clusters cut at `threshold` on the cosine (study parity) or scale-aware distance."""
    rows = np.asarray(rows, dtype=np.float64)
    n = len(rows)
    if n <= 1 or threshold >= 2.0:
        return np.zeros(n, dtype=np.int64)
    components = _threshold_components(rows, threshold, metric, component_limit)
    labels = np.empty(n, dtype=np.int64)
    next_label = 0
    for members in np.split(np.argsort(components, kind="stable"), np.cumsum(np.bincount(components))[:-1]):
        local = _average_linkage(rows[members], threshold, metric) if len(members) > 1 else np.zeros(1, np.int64)
        labels[members] = local + next_label
        next_label += int(local.max()) + 1
    return canonical(labels)


def _threshold_components(rows: np.ndarray, threshold: float, metric: str, component_limit: int) -> np.ndarray:
    """Connected components of the graph joining units at distance <= threshold, built block by block."""
    n = len(rows)
    single = rows.astype(np.float32)
    norms = np.linalg.norm(single, axis=1)
    components = np.arange(n)
    representative = np.arange(n)
    margin = 1e-5  # float32 blocks: keep borderline pairs, the dense step decides them in float64
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        distance = _distances(single[start:stop], single[start:], norms[start:stop], norms[start:], metric)
        i, j = np.nonzero(distance <= threshold + margin)
        keep = j > i
        sources = np.concatenate([np.arange(n), i[keep] + start])
        targets = np.concatenate([representative[components], j[keep] + start])
        components = _components(n, sources, targets)
        representative = np.empty(n, dtype=np.int64)
        representative[components[::-1]] = np.arange(n)[::-1]
        largest = np.bincount(components).max()
        if largest > component_limit:
            raise CollapseError(
                f"average linkage at t={threshold} joins {largest} of {n} units into one connected group, more "
                f"than the {component_limit} whose distance matrix fits in memory; lower the threshold or use "
                "metric=exact"
            )
    return components
