"""Optimizer state across a collapse (fibration.md §6) and the all-or-nothing guarantee."""

import pytest
import torch
from planted import one_hot, relative_error
from test_planted import EXACT, planted_mlp

import metta_collapse as mc
from metta_collapse import rewrite


def trained(seed: int = 0, steps: int = 3):
    _, big, _ = planted_mlp(seed, equal=steps > 0)  # equal column splits: training keeps the symmetry
    optimizer = torch.optim.Adam(big.parameters(), lr=1e-3)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(big(x), y).backward()
        optimizer.step()
    return big, optimizer, x, y


def snapshot(model, optimizer):
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    return params, state, [list(g["params"]) for g in optimizer.param_groups]


def test_collapsed_gradient_is_the_lifted_gradient():
    big, _, x, y = trained(steps=0)
    big.zero_grad()
    torch.nn.functional.mse_loss(big(x), y).backward()
    gradients = {name: p.grad.detach().clone() for name, p in big.named_parameters()}
    plan = mc.analyze(big, x, EXACT)
    mc.collapse(big, plan)
    big.zero_grad()
    torch.nn.functional.mse_loss(big(x), y).backward()
    s1, s2 = one_hot(plan.layers[0].partition).float(), one_hot(plan.layers[1].partition).float()
    lifted = {  # E^T g = S_out^T g S_in D_in^-1
        "0.weight": s1.T @ gradients["0.weight"],
        "0.bias": s1.T @ gradients["0.bias"],
        "2.weight": s2.T @ gradients["2.weight"] @ s1 / s1.sum(0),
        "2.bias": s2.T @ gradients["2.bias"],
        "4.weight": gradients["4.weight"] @ s2 / s2.sum(0),
    }
    for name, expected in lifted.items():
        assert relative_error(big.get_parameter(name).grad, expected) < 1e-5, name


def test_adam_state_is_mapped_by_name_and_training_continues():
    big, optimizer, x, y = trained()
    before = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in big.named_parameters()}
    plan = mc.analyze(big, x, EXACT)
    mc.collapse(big, plan, optimizer)
    s1, s2 = one_hot(plan.layers[0].partition).float(), one_hot(plan.layers[1].partition).float()
    d1, d2 = s1.sum(0), s2.sum(0)
    m, v = "exp_avg", "exp_avg_sq"
    expected = {
        "2.weight": (
            s2.T @ before["2.weight"][m] @ s1 / d1,
            d2[:, None] ** 2 * ((s2.T @ before["2.weight"][v] @ s1) / d2[:, None] / d1),
        ),
        "0.bias": (s1.T @ before["0.bias"][m], d1**2 * (s1.T @ before["0.bias"][v]) / d1),
        "4.weight": (before["4.weight"][m] @ s2 / d2, before["4.weight"][v] @ s2 / d2),
    }
    for name, (first, second) in expected.items():
        state = optimizer.state[big.get_parameter(name)]
        assert state[m].shape == big.get_parameter(name).shape
        assert relative_error(state[m], first) < 1e-6 and relative_error(state[v], second) < 1e-6, name
        assert state["step"] == before[name]["step"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in big.parameters()}
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(big(x), y).backward()
        optimizer.step()
    assert torch.isfinite(big(x)).all()


@pytest.mark.parametrize("operation", ["collapse", "ablate"])
def test_a_failure_between_model_and_optimizer_rewrites_changes_nothing(monkeypatch, operation):
    big, optimizer, x, _ = trained()
    plan = mc.analyze(big, x, EXACT)
    params, state, groups = snapshot(big, optimizer)
    modules = dict(big.named_modules())
    output = big(x).detach()

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(rewrite, "_remap", broken)
    with pytest.raises(RuntimeError, match="injected"):
        mc.collapse(big, plan, optimizer) if operation == "collapse" else mc.ablate(big, plan, 0, optimizer)
    assert dict(big.named_modules()) == modules
    for name, p in big.named_parameters():
        assert torch.equal(p, params[name]) and all(
            torch.equal(optimizer.state[p][k], t) for k, t in state[name].items()
        )
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert big[0].out_features == params["0.weight"].shape[0]
    assert torch.equal(big(x).detach(), output)


def test_ablation_keeps_the_widths_and_selects_weights_and_state():
    big, optimizer, x, _ = trained()
    plan = mc.analyze(big, x, EXACT)
    old_weight = big[2].weight.detach().clone()
    old_state = optimizer.state[big[2].weight]["exp_avg_sq"].clone()
    assert [layer.width_after for layer in plan.layers] == [5, 7, 3]
    mc.ablate(big, plan, seed=7, optimizer=optimizer)
    assert sum(p.numel() for p in big.parameters()) == plan.params_after
    rows, columns = plan.kept["2"], plan.kept["0"]
    assert torch.equal(big[2].weight, old_weight[rows][:, columns])
    assert torch.equal(optimizer.state[big[2].weight]["exp_avg_sq"], old_state[rows][:, columns])
    assert rewrite.random_selection(plan, 8)["0"].tolist() != columns.tolist()  # the seed chooses the units


def test_scratch_null_model_has_the_collapsed_widths_and_fresh_weights():
    big, _, x, _ = trained()
    plan = mc.analyze(big, x, EXACT)
    mc.ablate(big, plan, seed=0)
    kept = big[0].weight.detach().clone()
    mc.reinitialize(big, seed=1)
    assert sum(p.numel() for p in big.parameters()) == plan.params_after
    assert not torch.equal(big[0].weight, kept)


def test_remap_optimizer_as_a_separate_call():
    big, optimizer, x, y = trained()
    plan = mc.analyze(big, x, EXACT)
    with pytest.raises(mc.CollapseError, match="collapse"):
        mc.remap_optimizer(optimizer, big, plan)
    mc.collapse(big, plan)
    mc.remap_optimizer(optimizer, big, plan)
    assert optimizer.state[big[0].weight]["exp_avg"].shape == big[0].weight.shape


def test_schedule_free_iterate_maps_like_the_weights_so_the_averaged_policy_keeps_its_function():
    """Metta's default optimizer: the parameters hold y, the state holds z, evaluation uses x = lerp(y, z)."""
    import schedulefree

    _, big, _ = planted_mlp(0, equal=True)
    optimizer = schedulefree.AdamWScheduleFree(big.parameters(), lr=1e-2)
    optimizer.train()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(big(x), y).backward()
        optimizer.step()
    optimizer.eval()
    averaged = big(x).detach()
    optimizer.train()
    plan = mc.analyze(big, x, EXACT)
    mc.collapse(big, plan, optimizer)
    assert plan.params_after < plan.params_before
    assert all(optimizer.state[p]["z"].shape == p.shape for p in big.parameters())
    optimizer.eval()
    assert relative_error(big(x), averaged) < 1e-5
    optimizer.train()
    torch.nn.functional.mse_loss(big(x), y).backward()
    optimizer.step()
    assert torch.isfinite(big(x)).all()


class NestedMomentum(torch.optim.Optimizer):
    """State laid out like heavyball's Muon (Metta's `muon`): {group index: {"nesterov_ema_momentum_1", "step"}}."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                inner = self.state[p].setdefault(0, {"step": 0, "nesterov_ema_momentum_1": torch.zeros_like(p)})
                inner["nesterov_ema_momentum_1"].lerp_(p.grad, 0.1)
                inner["step"] += 1
                p.sub_(inner["nesterov_ema_momentum_1"], alpha=group["lr"])


def test_nested_momentum_state_is_mapped_as_a_first_moment():
    _, big, _ = planted_mlp(0, equal=True)
    optimizer = NestedMomentum(big.parameters())
    x = torch.randn(32, 6)
    big(x).square().sum().backward()
    optimizer.step()
    momentum = optimizer.state[big[2].weight][0]["nesterov_ema_momentum_1"].clone()
    plan = mc.analyze(big, x, EXACT)
    mc.collapse(big, plan, optimizer)
    s1, s2 = one_hot(plan.layers[0].partition).float(), one_hot(plan.layers[1].partition).float()
    inner = optimizer.state[big[2].weight][0]
    assert relative_error(inner["nesterov_ema_momentum_1"], s2.T @ momentum @ s1 / s1.sum(0)) < 1e-6
    assert inner["step"] == 1


def test_unknown_optimizer_state_is_refused_naming_it_and_the_way_out():
    big, optimizer, x, _ = trained()
    optimizer.state[big[0].weight]["mystery"] = torch.zeros_like(big[0].weight)
    with pytest.raises(mc.CollapseError, match="'mystery' of '0.weight'.*optimizer_state=reset"):
        mc.collapse(big, mc.analyze(big, x, EXACT), optimizer)
