"""Properties of the coloring and the collapse maps (fibration.md §9)."""

import numpy as np
import pytest
import torch
from planted import one_hot, relative_error, same_partition
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from test_planted import EXACT, mlp, planted_mlp
from torch import nn

import metta_collapse as mc
from metta_collapse import cluster


def cosine(**thresholds) -> mc.CollapseConfig:
    return mc.CollapseConfig(thresholds=mc.Thresholds(**thresholds))


def test_zero_threshold_on_a_random_network_merges_nothing():
    torch.manual_seed(0)
    net = mlp([8, 32, 16, 4])
    plan = mc.analyze(net, torch.randn(4, 8), cosine(linear=0.0))
    assert all(layer.width_after == layer.width_before for layer in plan.layers)
    assert plan.params_after == plan.params_before


def test_threshold_two_leaves_one_unit_per_layer_and_outputs_keep_their_size():
    torch.manual_seed(0)
    net = mlp([8, 32, 16, 4])
    x = torch.randn(4, 8)
    plan = mc.analyze(net, x, cosine(linear=2.0))
    assert [layer.width_after for layer in plan.layers] == [1, 1, 4]
    mc.collapse(net, plan)
    assert net(x).shape == (4, 4)


def test_partition_is_nested_as_the_threshold_grows():
    torch.manual_seed(1)
    net = mlp([8, 64, 4])
    x = torch.randn(4, 8)
    partitions = [mc.analyze(net, x, cosine(linear=t)).layers[0].partition for t in (0.3, 0.6, 0.9, 1.2, 1.6, 2.0)]
    for finer, coarser in zip(partitions[:-1], partitions[1:], strict=True):
        assert len(set(zip(finer, coarser, strict=True))) == len(set(finer))  # every fine fiber in one coarse fiber


def test_permuting_hidden_units_relabels_the_partition_and_keeps_the_function():
    _, big, _ = planted_mlp(4)
    x = torch.randn(32, 6)
    plan = mc.analyze(big, x, EXACT)
    permutation = torch.randperm(big[0].out_features)
    permuted = mlp([6, big[0].out_features, big[2].out_features, 3])
    permuted.load_state_dict(big.state_dict())
    with torch.no_grad():
        permuted[0].weight.copy_(big[0].weight[permutation])
        permuted[0].bias.copy_(big[0].bias[permutation])
        permuted[2].weight.copy_(big[2].weight[:, permutation])
    permuted_plan = mc.analyze(permuted, x, EXACT)
    assert same_partition(np.asarray(plan.layers[0].partition)[permutation.numpy()], permuted_plan.layers[0].partition)
    assert same_partition(plan.layers[1].partition, permuted_plan.layers[1].partition)
    mc.collapse(big, plan)
    mc.collapse(permuted, permuted_plan)
    assert relative_error(permuted(x).detach(), big(x).detach()) < 1e-5


def test_exact_mode_respects_scale_zero_rows_and_biases():
    layer = nn.Linear(3, 6)
    with torch.no_grad():
        w = torch.tensor([1.0, -2.0, 0.5])
        layer.weight.copy_(torch.stack([w, 2 * w, torch.zeros(3), torch.zeros(3), w, w]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.0, 0.0, 0.1, 0.3]))
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 2))
    partition = mc.analyze(net, torch.randn(2, 3), EXACT).layers[0].partition
    assert partition[0] != partition[1]  # (w, b) vs (2w, 2b): relu(2z) != relu(z)
    assert partition[2] == partition[3]  # identical zero rows
    assert partition[0] == partition[4]  # identical rows
    assert partition[0] != partition[5]  # equal weights, different bias


def test_rows_equal_up_to_float32_rounding_merge():
    base = torch.randn(1, 40)
    splits = torch.rand(50, 40, 3)
    splits = splits / splits.sum(-1, keepdim=True)
    rows = (base[..., None] * splits).float().reshape(50, 120)  # one row, split differently 50 times
    labels = np.repeat(np.arange(40), 3)
    aggregated = torch.zeros(50, 40, dtype=torch.float64).index_add_(1, torch.as_tensor(labels), rows.double())
    assert cluster.count(cluster.exact_partition(aggregated.numpy(), 1e-4)) == 1


def test_bias_map_averages_fibers_of_unequal_size():
    _, big, (o1, _) = planted_mlp(5)
    assert len(set(np.bincount(o1))) > 1
    plan = mc.analyze(big, torch.randn(4, 6), EXACT)
    s = one_hot(plan.layers[0].partition)
    expected = (s.T @ big[0].bias.double()) / s.sum(0)
    mc.collapse(big, plan)
    assert torch.allclose(big[0].bias.double(), expected, rtol=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 32)
        self.critic = nn.Linear(32, 64)
        self.value = nn.Linear(64, 1)
        self.actor = nn.Linear(32, 64)
        self.logits = nn.Linear(64, 5)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.logits(torch.relu(self.actor(h))), self.value(torch.tanh(self.critic(h)))


def test_critic_threshold_applies_to_layers_reaching_only_the_value():
    torch.manual_seed(0)
    net = TwoHeads()
    spec = mc.ModelSpec(outputs=["logits", "value"])
    plan = mc.analyze(net, torch.randn(4, 8), cosine(linear=0.0, critic=2.0), spec)
    widths = {layer.name: (layer.kind, layer.width_after) for layer in plan.layers}
    assert widths == {
        "trunk": ("linear", 32),
        "critic": ("critic", 1),
        "value": ("critic", 1),
        "actor": ("linear", 64),
        "logits": ("linear", 5),
    }


def _scipy_partition(rows: np.ndarray, t: float) -> np.ndarray:
    distances = np.clip(pdist(rows, "cosine"), 0.0, 2.0)
    return fcluster(linkage(distances, "average"), t, "distance")


def _clustered_rows(n: int, seed: int, dims: int = 65, noise: float = 0.6) -> np.ndarray:
    g = np.random.default_rng(seed)
    centers = g.standard_normal((n // 4, dims))
    return centers[g.integers(0, n // 4, n)] + noise * g.standard_normal((n, dims))


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0])
def test_cosine_partition_is_scipy_average_linkage(t):
    torch.manual_seed(0)
    layer = nn.Linear(64, 400)
    rows = _clustered_rows(400, 0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows[:, :64]))
        layer.bias.copy_(torch.tensor(rows[:, 64]))
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(400, 3))
    engine = mc.analyze(net, torch.randn(2, 64), cosine(linear=t)).layers[0].partition
    reference = _scipy_partition(
        np.concatenate([layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()[:, None]], axis=1),
        t,
    )
    assert same_partition(engine, reference)


def test_wide_path_matches_scipy_where_scipy_fits():
    rows = _clustered_rows(3000, 1, dims=257, noise=0.5)
    wide = cluster.linkage_partition(rows, 0.7, "cosine", component_limit=200)
    assert same_partition(wide, _scipy_partition(rows, 0.7))
    assert 200 < cluster.count(wide) < 3000


def test_scale_aware_metric_separates_scaled_rows():
    rows = np.array([[1.0, 2.0, 0.5], [2.0, 4.0, 1.0], [1.01, 2.0, 0.5]])
    assert same_partition(cluster.linkage_partition(rows, 0.2, "cosine"), [0, 0, 0])
    assert same_partition(cluster.linkage_partition(rows, 0.2, "scale_aware"), [0, 1, 0])
