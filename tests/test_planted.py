"""Planted symmetry (fibration.md §9): exact mode recovers the planted fibers and the collapse keeps the function."""

import numpy as np
import pytest
import torch
from planted import expand, expand_rows, gate_owner, owners, relative_error, same_partition, sizes
from torch import nn

import metta_collapse as mc

EXACT = mc.CollapseConfig(metric="exact")


def mlp(widths: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU() if i % 2 == 0 else nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def planted_mlp(seed: int = 0, equal: bool = False):
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = mlp([6, 5, 7, 3])
    o1, o2 = owners(sizes(5, g), g), owners(sizes(7, g), g)
    big = mlp([6, len(o1), len(o2), 3])
    with torch.no_grad():
        big[0].weight.copy_(expand(base[0].weight, o1, None, g))
        big[0].bias.copy_(expand_rows(base[0].bias, o1))
        big[2].weight.copy_(expand(base[2].weight, o2, o1, g, equal))
        big[2].bias.copy_(expand_rows(base[2].bias, o2))
        big[4].weight.copy_(expand(base[4].weight, None, o2, g, equal))
        big[4].bias.copy_(base[4].bias)
    return base, big, (o1, o2)


def test_mlp_recovers_planted_fibers_and_function():
    base, big, (o1, o2) = planted_mlp()
    x = torch.randn(64, 6)
    reference = base(x).detach()
    plan = mc.analyze(big, x, EXACT)
    assert [layer.width_after for layer in plan.layers] == [5, 7, 3]
    assert same_partition(plan.layers[0].partition, o1) and same_partition(plan.layers[1].partition, o2)
    mc.collapse(big, plan)
    assert [big[0].out_features, big[2].out_features, big[4].out_features] == [5, 7, 3]
    assert relative_error(big(x).detach(), reference) < 1e-5
    assert plan.params_after == sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in base.parameters())


class ConvNet(nn.Module):
    def __init__(self, c1: int, c2: int, hidden: int):
        super().__init__()
        self.cnn1 = nn.Conv2d(3, c1, 3)
        self.cnn2 = nn.Conv2d(c1, c2, 3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * 9, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        x = torch.relu(self.cnn2(torch.relu(self.cnn1(x))))
        return self.out(torch.relu(self.fc(self.flatten(x))))


def test_conv_flatten_with_spatial_positions():
    g = np.random.default_rng(1)
    torch.manual_seed(1)
    base = ConvNet(4, 5, 6)
    o1, o2, o3 = owners(sizes(4, g), g), owners(sizes(5, g), g), owners(sizes(6, g), g)
    big = ConvNet(len(o1), len(o2), len(o3))
    flat_owner = (o2[:, None] * 9 + np.arange(9)).ravel()
    with torch.no_grad():
        big.cnn1.weight.copy_(expand(base.cnn1.weight, o1, None, g))
        big.cnn1.bias.copy_(expand_rows(base.cnn1.bias, o1))
        big.cnn2.weight.copy_(expand(base.cnn2.weight, o2, o1, g))
        big.cnn2.bias.copy_(expand_rows(base.cnn2.bias, o2))
        big.fc.weight.copy_(expand(base.fc.weight, o3, flat_owner, g))
        big.fc.bias.copy_(expand_rows(base.fc.bias, o3))
        big.out.weight.copy_(expand(base.out.weight, None, o3, g))
        big.out.bias.copy_(base.out.bias)
    x = torch.randn(16, 3, 7, 7)
    reference = base(x).detach()
    plan = mc.analyze(big, x, EXACT)
    assert {layer.name: layer.width_after for layer in plan.layers} == {"cnn1": 4, "cnn2": 5, "fc": 6, "out": 2}
    mc.collapse(big, plan)
    assert relative_error(big(x).detach(), reference) < 1e-5
    assert big.fc.in_features == 5 * 9


class Recurrent(nn.Module):
    """Encoder on (B*T, F) -> reshape to (B, T, E) -> two single-layer LSTMs -> head on (B*T, H2)."""

    def __init__(self, features: int, encoded: int, h1: int, h2: int):
        super().__init__()
        self.enc = nn.Linear(features, encoded)
        self.lstm1 = nn.LSTM(encoded, h1, batch_first=True)
        self.lstm2 = nn.LSTM(h1, h2, batch_first=True)
        self.head = nn.Linear(h2, 3)

    def forward(self, x, h1, c1, h2, c2):
        z = torch.relu(self.enc(x))
        z = z.reshape(h1.shape[0], -1, z.shape[-1])
        out, (h1, c1) = self.lstm1(z, (h1.unsqueeze(0), c1.unsqueeze(0)))
        out, (h2, c2) = self.lstm2(out, (h2.unsqueeze(0), c2.unsqueeze(0)))
        return self.head(out.reshape(-1, out.shape[-1])), h1.squeeze(0), c1.squeeze(0), h2.squeeze(0), c2.squeeze(0)


RECURRENT_SPEC = mc.ModelSpec(
    inputs={"x": mc.InputSpec(axis=1), **{n: mc.InputSpec(role="state") for n in ("h1", "c1", "h2", "c2")}},
    outputs=["logits", "state", "state", "state", "state"],
)


def copy_lstm(big: nn.LSTM, base: nn.LSTM, layer: int, in_owner, owner, base_width: int, g, big_layer: int = 0):
    rows = gate_owner(owner, base_width)
    suffix, big_suffix = f"_l{layer}", f"_l{big_layer}"
    getattr(big, "weight_ih" + big_suffix).copy_(expand(getattr(base, "weight_ih" + suffix), rows, in_owner, g))
    getattr(big, "weight_hh" + big_suffix).copy_(expand(getattr(base, "weight_hh" + suffix), rows, owner, g))
    for name in ("bias_ih", "bias_hh"):
        getattr(big, name + big_suffix).copy_(expand_rows(getattr(base, name + suffix), rows))


def planted_recurrent(seed: int = 2):
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = Recurrent(5, 4, 3, 6)
    oe, o1, o2 = owners(sizes(4, g), g), owners(np.array([3, 1, 2]), g), owners(sizes(6, g), g)
    big = Recurrent(5, len(oe), len(o1), len(o2))
    with torch.no_grad():
        big.enc.weight.copy_(expand(base.enc.weight, oe, None, g))
        big.enc.bias.copy_(expand_rows(base.enc.bias, oe))
        copy_lstm(big.lstm1, base.lstm1, 0, oe, o1, 3, g)
        copy_lstm(big.lstm2, base.lstm2, 0, o1, o2, 6, g)
        big.head.weight.copy_(expand(base.head.weight, None, o2, g))
        big.head.bias.copy_(base.head.bias)
    return base, big, (oe, o1, o2)


def test_two_lstm_layers_of_different_widths_over_many_steps():
    base, big, (_, o1, o2) = planted_recurrent()
    batch, steps = 4, 24
    x = torch.randn(batch * steps, 5)
    states = [torch.randn(batch, 3), torch.randn(batch, 3), torch.randn(batch, 6), torch.randn(batch, 6)]
    big_states = [states[0][:, o1], states[1][:, o1], states[2][:, o2], states[3][:, o2]]
    reference = [t.detach() for t in base(x, *states)]
    big_out = [t.detach() for t in big(x, *big_states)]
    plan = mc.analyze(big, (x, *big_states), EXACT, RECURRENT_SPEC)
    assert {layer.name: layer.width_after for layer in plan.layers} == {"enc": 4, "lstm1": 3, "lstm2": 6, "head": 3}
    mc.collapse(big, plan)
    assert (big.lstm1.hidden_size, big.lstm2.hidden_size) == (3, 6)
    names = ("h1", "c1", "h2", "c2")
    mapped = [mc.map_state(plan, name, t) for name, t in zip(names, big_states, strict=True)]
    logits, *new_states = big(x, *mapped)
    assert relative_error(logits.detach(), reference[0]) < 1e-5
    for name, got, want in zip(names, new_states, big_out[1:], strict=True):  # states follow the LSTM's fibers
        assert relative_error(got.detach(), mc.map_state(plan, name, want)) < 1e-5


class MultiLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x, h, c):
        out, (h, c) = self.lstm(x, (h, c))
        return self.head(out), h, c


def test_multilayer_lstm_with_different_widths_becomes_a_stack():
    g = np.random.default_rng(3)
    torch.manual_seed(3)
    base1, base2 = nn.LSTM(4, 3, batch_first=True), nn.LSTM(3, 5, batch_first=True)
    head = nn.Linear(5, 2)
    o1, o2 = owners(np.array([2, 2, 2]), g), owners(np.array([1, 1, 2, 1, 1]), g)
    big = MultiLayer(6)
    with torch.no_grad():
        copy_lstm(big.lstm, base1, 0, None, o1, 3, g, big_layer=0)
        copy_lstm(big.lstm, base2, 0, o1, o2, 5, g, big_layer=1)
        big.head.weight.copy_(expand(head.weight, None, o2, g))
        big.head.bias.copy_(head.bias)
    x = torch.randn(3, 20, 4)
    h, c = torch.zeros(2, 3, 6), torch.zeros(2, 3, 6)
    out1, (h1, c1) = base1(x)
    out2, _ = base2(out1)
    reference = head(out2).detach()
    spec = mc.ModelSpec(
        inputs={"x": mc.InputSpec(axis=2), "h": mc.InputSpec(role="state"), "c": mc.InputSpec(role="state")},
        outputs=["logits", "state", "state"],
    )
    plan = mc.analyze(big, (x, h, c), EXACT, spec)
    assert [layer.width_after for layer in plan.layers[:2]] == [3, 5]
    mc.collapse(big, plan)
    assert isinstance(big.lstm, mc.RecurrentStack) and [m.hidden_size for m in big.lstm.layers] == [3, 5]
    new_h = mc.map_state(plan, "h", h)
    assert new_h.shape == (1, 3, 8)
    out, h_n, _ = big(x, new_h, mc.map_state(plan, "c", c))
    assert relative_error(out.detach(), reference) < 1e-5
    assert h_n.shape == (1, 3, 8)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_is_idempotent(seed):
    _, big, _ = planted_mlp(seed)
    x = torch.randn(8, 6)
    mc.collapse(big, mc.analyze(big, x, EXACT))
    again = mc.analyze(big, x, EXACT)
    assert all(layer.width_after == layer.width_before for layer in again.layers)
    assert again.params_after == again.params_before
