"""The rule registry: models whose operations the engine has a rule for, has none for, or is taught one for —
each with planted duplicate units, collapsed with `metric=exact`."""

import warnings

import pytest
import torch
from planted import relative_error
from test_planted import EXACT
from torch import nn

import metta_collapse as mc


def duplicate_rows(*layers: nn.Module) -> None:
    """Every odd unit a copy of the even one before it: an exact fibration halves each layer."""
    with torch.no_grad():
        for layer in layers:
            layer.weight[1::2] = layer.weight[0::2]
            layer.bias[1::2] = layer.bias[0::2]


def collapse(model: nn.Module, x: torch.Tensor, graph=None) -> tuple[dict[str, int], list[str]]:
    model.eval()
    reference = model(x).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = mc.analyze(model, x, EXACT, graph=graph)
    mc.collapse(model, plan)
    assert relative_error(model(x).detach(), reference) < 1e-5
    return {layer.name: layer.width_after for layer in plan.layers}, [str(w.message) for w in caught]


class PooledConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3)
        self.pool, self.gap = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 1)
        return self.out(torch.flatten(self.gap(x), 1))


def test_pooling_passes_the_channels_colors():
    torch.manual_seed(0)
    model = PooledConv()
    duplicate_rows(model.conv1, model.conv2)
    widths, caught = collapse(model, torch.randn(4, 3, 12, 12))
    assert widths == {"conv1": 4, "conv2": 3, "out": 2} and caught == []


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.shared, self.out = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.out(torch.relu(self.shared(torch.relu(self.shared(h)))))


def test_a_module_called_twice_is_a_barrier_and_the_units_before_it_still_merge():
    torch.manual_seed(1)
    model = Shared()
    duplicate_rows(model.a, model.b)
    widths, caught = collapse(model, torch.randn(16, 5))
    assert widths["a"] == 4 and widths["b"] == 6 and "shared" not in widths
    assert model.shared.weight.shape == (6, 6)
    assert any("Linear module 'shared'" in message and "barrier" in message for message in caught)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x))).unsqueeze(1)
        return self.out(self.layer(h).squeeze(1))


def test_a_module_without_a_rule_is_a_barrier_with_a_warning_and_upstream_units_still_merge():
    torch.manual_seed(2)
    model = Encoder()
    duplicate_rows(model.a, model.b)
    widths, caught = collapse(model, torch.randn(16, 5))
    assert widths["a"] == 4 and widths["b"] == 16
    assert any("TransformerEncoderLayer module 'layer'" in message for message in caught)


class Gain(nn.Module):
    """A user's module that fx cannot trace (data-dependent control flow): it enters the graph as one call."""

    def forward(self, x):
        return 2 * x if x.sum() > 0 else x


class WithGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gain, self.out = nn.Linear(5, 8), Gain(), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.gain(torch.relu(self.a(x))))


@pytest.mark.parametrize("taught", [False, True])
def test_a_users_module_takes_the_rule_registered_for_it(taught: bool):
    torch.manual_seed(3)
    model = WithGain()
    duplicate_rows(model.a)
    S = mc.Step
    graph = mc.chain_graph(model, ["x"], [S("a", ("x",)), S(torch.relu), S("gain"), S("out")], ["out"])
    if taught:
        mc.register_rule(Gain, mc.pass_colors)
    try:
        widths, caught = collapse(model, torch.randn(16, 5), graph)
    finally:
        mc.analysis.RULES.pop(Gain, None)
    assert widths["a"] == (4 if taught else 8)
    assert any("Gain module 'gain'" in message for message in caught) != taught
