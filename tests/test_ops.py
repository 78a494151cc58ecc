"""Planted symmetry through the other operations of fibration.md §4, and the layer-chain graph."""

import operator

import numpy as np
import torch
from planted import expand, expand_rows, owners, relative_error, sizes
from test_planted import EXACT, RECURRENT_SPEC, planted_recurrent
from torch import nn

import metta_collapse as mc
from metta_collapse.cluster import canonical, count


class Mixer(nn.Module):
    """add of two layers with different fibers, a per-feature scale, x @ W or einsum, cat with a plain layer."""

    def __init__(self, n1: int, n2: int, use_einsum: bool = False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, n1), nn.Linear(5, n1), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.randn(n1))
        self.w = nn.Parameter(torch.randn(n1, n2))
        self.out = nn.Linear(n2 + 3, 2)
        self.use_einsum = use_einsum

    def forward(self, x):
        h = torch.relu(self.a(x) + self.b(x)) * self.scale
        z = torch.einsum("bi,ij->bj", h, self.w) if self.use_einsum else h @ self.w
        return self.out(torch.cat([torch.tanh(z), self.c(x)], dim=-1))


def test_add_scale_matmul_einsum_and_cat():
    for use_einsum in (False, True):
        g = np.random.default_rng(0)
        oa, ob = owners(sizes(6, g), g), None
        ob = g.integers(0, 3, size=len(oa))  # b's fibers differ from a's: the add needs their common refinement
        pair = canonical(oa, ob)
        o2 = owners(sizes(4, g), g)
        base = Mixer(count(pair), 4, use_einsum)
        big = Mixer(len(oa), len(o2), use_einsum)
        first = [np.flatnonzero(pair == k)[0] for k in range(count(pair))]
        with torch.no_grad():
            a_rows, b_rows = torch.randn(6, 5), torch.randn(3, 5)
            big.a.weight.copy_(a_rows[oa]), big.b.weight.copy_(b_rows[ob])
            big.a.bias.zero_(), big.b.bias.zero_()
            base.a.weight.copy_(big.a.weight[first]), base.b.weight.copy_(big.b.weight[first])
            base.a.bias.zero_(), base.b.bias.zero_()
            big.scale.copy_(expand_rows(base.scale, pair))
            big.w.copy_(expand(base.w.T, o2, pair, g).T)
            big.c.load_state_dict(base.c.state_dict())
            in_owner = np.concatenate([o2, 4 + np.arange(3)])
            big.out.weight.copy_(expand(base.out.weight, None, in_owner, g))
            big.out.bias.copy_(base.out.bias)
        x = torch.randn(16, 5)
        plan = mc.analyze(big, x, EXACT)
        widths = {layer.name: layer.width_after for layer in plan.layers if layer.kind != "parameter"}
        assert widths == {"a": count(pair), "b": count(pair), "w": 4, "c": 3, "out": 2}
        mc.collapse(big, plan)
        assert relative_error(big(x).detach(), base(x).detach()) < 1e-5


class ConvZoo(nn.Module):
    def __init__(self, channels: int, embedding: int):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, groups=channels, padding=1)
        self.fc = nn.Linear(channels * 25, 4)
        self.embed = nn.Embedding(10, embedding)
        self.head = nn.Linear(4 + embedding, 2)

    def forward(self, x, index):
        y = torch.relu(self.depthwise(torch.relu(self.bn(self.conv(x)))))
        y = torch.relu(self.fc(y.flatten(1)))
        return self.head(torch.cat([y, torch.relu(self.embed(index))], dim=-1))


def test_batchnorm_depthwise_conv_and_embedding():
    g = np.random.default_rng(1)
    torch.manual_seed(1)
    base = ConvZoo(4, 3)
    with torch.no_grad():
        base.bn.running_mean.uniform_(-1, 1), base.bn.running_var.uniform_(0.5, 2), base.bn.weight.uniform_(0.5, 2)
    oc, oe = owners(sizes(4, g), g), owners(sizes(3, g), g)
    big = ConvZoo(len(oc), len(oe))
    with torch.no_grad():
        big.conv.weight.copy_(expand(base.conv.weight, oc, None, g))
        big.conv.bias.copy_(expand_rows(base.conv.bias, oc))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(big.bn, name).copy_(expand_rows(getattr(base.bn, name), oc))
        big.depthwise.weight.copy_(expand_rows(base.depthwise.weight, oc))
        big.depthwise.bias.copy_(expand_rows(base.depthwise.bias, oc))
        big.fc.weight.copy_(expand(base.fc.weight, None, (oc[:, None] * 25 + np.arange(25)).ravel(), g))
        big.fc.bias.copy_(base.fc.bias)
        big.embed.weight.copy_(base.embed.weight[:, oe])
        big.head.weight.copy_(expand(base.head.weight, None, np.concatenate([np.arange(4), 4 + oe]), g))
        big.head.bias.copy_(base.head.bias)
    x, index = torch.randn(8, 3, 5, 5), torch.randint(0, 10, (8,))
    big.eval(), base.eval()
    spec = mc.ModelSpec(inputs={"index": mc.InputSpec(role="index")})
    plan = mc.analyze(big, (x, index), EXACT, spec)
    widths = {layer.name: layer.width_after for layer in plan.layers}
    assert widths["conv"] == 4 and widths["embed"] == 3
    mc.collapse(big, plan)
    assert (big.bn.num_features, big.depthwise.groups, big.embed.embedding_dim) == (4, 4, 3)
    assert relative_error(big(x, index).detach(), base(x, index).detach()) < 1e-5


def test_layer_chain_graph_gives_the_traced_plan():
    _, big, _ = planted_recurrent()
    x = torch.randn(4 * 20, 5)
    states = [torch.zeros(4, big.lstm1.hidden_size)] * 2 + [torch.zeros(4, big.lstm2.hidden_size)] * 2
    S = mc.Step

    def lstm(k: int, source: str) -> list[mc.Step]:  # layer k from state (h{k}, c{k}): outputs o{k}, h{k}n, c{k}n
        return [
            S(torch.unsqueeze, (f"h{k}", 0), name=f"h{k}u"),
            S(torch.unsqueeze, (f"c{k}", 0), name=f"c{k}u"),
            S(f"lstm{k}", (source, (f"h{k}u", f"c{k}u")), name=f"l{k}"),
            S(operator.getitem, (f"l{k}", 0), name=f"o{k}"),
            S(operator.getitem, (f"l{k}", 1), name=f"s{k}"),
            S(operator.getitem, (f"s{k}", 0), name=f"h{k}n"),
            S(operator.getitem, (f"s{k}", 1), name=f"c{k}n"),
        ]

    steps = [
        S("enc", ("x",)),
        S(torch.relu, name="e"),
        S(torch.reshape, ("e", (4, -1, big.enc.out_features)), name="z"),
        *lstm(1, "z"),
        *lstm(2, "o1"),
        S(torch.reshape, ("o2", (-1, big.lstm2.hidden_size)), name="flat"),
        S("head", ("flat",), name="logits"),
    ]
    graph = mc.chain_graph(big, ["x", "h1", "c1", "h2", "c2"], steps, ["logits", "h1n", "c1n", "h2n", "c2n"])
    described = mc.analyze(big, (x, *states), EXACT, RECURRENT_SPEC, graph=graph)
    traced = mc.analyze(big, (x, *states), EXACT, RECURRENT_SPEC)
    assert described.to_json() == traced.to_json()
    assert [layer.width_after for layer in described.layers] == [4, 3, 6, 3]
