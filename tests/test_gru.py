"""GRU (and plain RNN) cores, first-class like the LSTM: planted copies of hidden units merge exactly, in one
layer or several, with their recurrent states; the basis and the refit work on them too."""

import copy

import numpy as np
import pytest
import torch
from planted import expand, expand_rows, gate_owner, owners, relative_error, sizes
from test_planted import EXACT
from torch import nn

import metta_collapse as mc

GATES = {nn.GRU: 3, nn.RNN: 1}


class Policy(nn.Module):
    """Encoder on (B, T, F) -> a recurrent core with state input h -> logits and value heads."""

    def __init__(self, cell: type[nn.RNNBase], encoded: int, hidden: int, layers: int = 1):
        super().__init__()
        self.enc = nn.Linear(5, encoded)
        self.core = cell(encoded, hidden, num_layers=layers, batch_first=True)
        self.logits, self.value = nn.Linear(hidden, 3), nn.Linear(hidden, 1)

    def forward(self, x, h):
        out, h = self.core(torch.relu(self.enc(x)), h)
        return self.logits(out), self.value(out), h


SPEC = mc.ModelSpec(
    inputs={"x": mc.InputSpec(axis=2), "h": mc.InputSpec(role="state")},
    outputs=["logits", "value", "state"],
)


def copy_layer(big: nn.RNNBase, base: nn.RNNBase, big_layer: int, in_owner, owner, g) -> None:
    """Layer `big_layer` of `big`: layer 0 of `base` with hidden units copied by `owner`, inputs by `in_owner`."""
    rows = gate_owner(owner, base.hidden_size, GATES[type(base)])
    suffix = f"_l{big_layer}"
    getattr(big, "weight_ih" + suffix).copy_(expand(base.weight_ih_l0, rows, in_owner, g))
    getattr(big, "weight_hh" + suffix).copy_(expand(base.weight_hh_l0, rows, owner, g))
    for name in ("bias_ih", "bias_hh"):
        getattr(big, name + suffix).copy_(expand_rows(getattr(base, name + "_l0"), rows))


def planted(cell: type[nn.RNNBase], hidden: list[int], seed: int = 0):
    """A policy whose encoder units and every core layer's hidden units are copies of a smaller one's; the base's
    layers as single-layer modules (the collapsed widths may differ between layers)."""
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    enc = nn.Linear(5, 4)
    bases = [cell(i, o, batch_first=True) for i, o in zip([4, *hidden[:-1]], hidden, strict=True)]
    oe = owners(sizes(4, g), g)
    fibers = [owners(sizes(width, g), g) for width in hidden]
    if len(hidden) > 1:  # one width for the big module's layers
        fibers = [owners(np.full(width, 12 // width), g) for width in hidden]
    big = Policy(cell, len(oe), len(fibers[0]), len(hidden))
    heads = nn.Linear(hidden[-1], 3), nn.Linear(hidden[-1], 1)
    with torch.no_grad():
        big.enc.weight.copy_(expand(enc.weight, oe, None, g))
        big.enc.bias.copy_(expand_rows(enc.bias, oe))
        for layer, (base, owner) in enumerate(zip(bases, fibers, strict=True)):
            copy_layer(big.core, base, layer, oe if layer == 0 else fibers[layer - 1], owner, g)
        for head, small in zip((big.logits, big.value), heads, strict=True):
            head.weight.copy_(expand(small.weight, None, fibers[-1], g))
            head.bias.copy_(small.bias)

    def reference(x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's logits and value (its hidden units in another order than the collapsed ones')."""
        out = torch.relu(enc(x))
        for base, h in zip(bases, states, strict=True):
            out, _ = base(out, h.unsqueeze(0))
        return heads[0](out).detach(), heads[1](out).detach()

    return big, fibers, reference


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_a_planted_recurrent_core_merges_exactly_with_its_state_and_optimizer(cell):
    big, (owner,), reference = planted(cell, [6])
    batch, steps = 4, 24
    x, h = torch.randn(batch, steps, 5), torch.randn(batch, 6)
    want = reference(x, [h])
    big_h = h[:, owner].unsqueeze(0)
    big_h_n = big(x, big_h)[2].detach()
    plan = mc.analyze(big, (x, big_h), EXACT, SPEC)
    optimizer = torch.optim.Adam(big.parameters(), lr=0.0)
    sum(out.square().sum() for out in big(x, big_h)).backward()
    optimizer.step()
    assert {layer.name: layer.width_after for layer in plan.layers} == {"enc": 4, "core": 6, "logits": 3, "value": 1}
    mc.collapse(big, plan, optimizer)
    assert big.core.hidden_size == 6 and big.core.weight_ih_l0.shape == (6 * GATES[cell], 4)
    logits, value, h_n = big(x, mc.map_state(plan, "h", big_h))
    assert relative_error(logits.detach(), want[0]) < 1e-5 and relative_error(value.detach(), want[1]) < 1e-5
    assert relative_error(h_n.detach(), mc.map_state(plan, "h", big_h_n)) < 1e-5  # the state follows the fibers
    # the optimizer holds the new parameters, its state mapped to their shapes
    assert all(optimizer.state[p]["exp_avg_sq"].shape == p.shape for p in big.parameters())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in big.parameters()}


def test_a_two_layer_gru_of_different_collapsed_widths_becomes_a_stack():
    big, fibers, reference = planted(nn.GRU, [3, 4], seed=1)
    x = torch.randn(3, 20, 5)
    h = torch.stack([torch.randn(3, 3)[:, fibers[0]], torch.randn(3, 4)[:, fibers[1]]])  # copies in each fiber
    _, _, big_h_n = big(x, h)
    plan = mc.analyze(big, (x, h), EXACT, SPEC)
    assert [layer.width_after for layer in plan.layers if layer.kind == "lstm"] == [3, 4]
    mc.collapse(big, plan)
    assert isinstance(big.core, mc.RecurrentStack) and [m.hidden_size for m in big.core.layers] == [3, 4]
    mapped = mc.map_state(plan, "h", h)
    assert mapped.shape == (1, 3, 7)
    _, _, h_n = big(x, mapped)
    assert relative_error(h_n.detach(), mc.map_state(plan, "h", big_h_n.detach())) < 1e-5
    zero = torch.zeros(1, 3, 7)
    logits, value, _ = big(x, zero)
    want = reference(x, [torch.zeros(3, 3), torch.zeros(3, 4)])
    assert relative_error(logits.detach(), want[0]) < 1e-5 and relative_error(value.detach(), want[1]) < 1e-5


def test_on_a_planted_gru_the_basis_is_the_exact_fibration_and_the_refit_keeps_it():
    big, _, reference = planted(nn.GRU, [5], seed=2)
    x, h = torch.randn(50, 40, 5), torch.zeros(1, 50, big.core.hidden_size)
    original = copy.deepcopy(big)
    exact = mc.analyze(big, (x, h), EXACT, SPEC)
    tol = mc.RankTol(linear=1e-4, cnn=1e-4, lstm=1e-4, critic=1e-4)
    plan, kept, _ = mc.select_basis(big, (x, h), SPEC, rank_tol=tol)
    assert [layer.width_after for layer in plan.layers] == [layer.width_after for layer in exact.layers]
    mc.keep(big, plan, kept)
    report = mc.refit(big, original, plan, (x, h))
    assert "core" in {layer["name"] for layer in report["layers"]}
    logits, value, _ = big(x, mc.map_state(plan, "h", h, plan.kept))
    want = reference(x, [torch.zeros(50, 5)])
    assert relative_error(logits.detach(), want[0]) < 1e-4 and relative_error(value.detach(), want[1]) < 1e-4


def test_every_refitted_gru_gate_fits_at_least_as_well_as_the_applied_weights():
    torch.manual_seed(4)
    model = Policy(nn.GRU, 16, 24, layers=2)
    x, h = torch.randn(40, 30, 5), torch.zeros(2, 40, 24)
    original = copy.deepcopy(model)
    plan, kept, _ = mc.select_basis(model, (x, h), SPEC, params=0.5)
    mc.keep(model, plan, kept)
    report = mc.refit(model, original, plan, (x, h))
    assert {"core.l0", "core.l1"} <= {layer["name"] for layer in report["layers"]}
    for layer in report["layers"]:
        assert layer["residual_refit"] <= layer["residual_applied"] * (1 + 1e-9) + 1e-12, layer
