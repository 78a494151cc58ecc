"""The refit and the units chosen from data (behaviour.md): properties that hold for any network."""

import copy

import numpy as np
import pytest
import torch
from planted import relative_error
from test_live import SMALL, SPEC, tokens, trained_planted
from test_planted import EXACT, mlp, planted_mlp

import metta_collapse as mc
from metta_collapse.training.policy import FastCore, FastPolicy


def random_policy(seed: int = 0) -> FastPolicy:
    torch.manual_seed(seed)
    return FastPolicy(FastCore(24, 11, 11, 5, SMALL), 11, 11, torch.ones(24))


def core_data(policy: FastPolicy, batch: int, steps: int, seed: int = 0) -> tuple:
    observations = tokens(batch, steps, seed)
    box = policy.box(observations.reshape(-1, *observations.shape[2:]))
    zeros = [torch.zeros(batch, lstm.hidden_size) for lstm in (policy.core.lstm1, policy.core.lstm2)]
    return box, zeros[0], zeros[0], zeros[1], zeros[1]


def outputs(core: torch.nn.Module, data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, value, *_ = core(*data)
    return logits, value


def test_exact_collapse_stays_exact_with_the_refit():
    _, policy, _, _ = trained_planted()
    data = core_data(policy, 16, 20)
    reference = outputs(policy.core, data)
    plain = copy.deepcopy(policy.core)
    plan = mc.analyze(policy.core, data, EXACT, SPEC)
    assert plan.params_after < plan.params_before
    mc.collapse(plain, plan)
    original = copy.deepcopy(policy.core)
    mc.collapse(policy.core, plan)
    mc.refit(policy.core, original, plan, data)
    small = [d if i == 0 else torch.zeros(16, d.shape[1] // 2) for i, d in enumerate(data)]
    fitted = mc.live.behaviour_change(reference, outputs(policy.core, small))
    merged = mc.live.behaviour_change(reference, outputs(plain, small))
    assert fitted["kl_mean"] <= 1e-6 and fitted["kl_mean"] <= merged["kl_mean"] + 1e-9
    assert fitted["value_err"] <= 1e-5


def test_a_plan_that_merges_nothing_leaves_the_model_unchanged():
    torch.manual_seed(0)
    net = mlp([8, 32, 16, 4])
    x = torch.randn(256, 8)
    plan = mc.analyze(net, x, mc.CollapseConfig(thresholds=mc.Thresholds(linear=0.0)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    original = copy.deepcopy(net)
    mc.collapse(net, plan)
    report = mc.refit(net, original, plan, (x,))
    assert report["layers"] == [] and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("select", ["cosine", "random", "basis"])
def test_every_refitted_layer_fits_its_data_at_least_as_well_as_the_applied_weights(select):
    policy = random_policy()
    data = core_data(policy, 32, 40)
    original = copy.deepcopy(policy.core)
    if select == "basis":
        plan, kept, _ = mc.select_basis(policy.core, data, SPEC, params=0.4)
        mc.keep(policy.core, plan, kept)
    else:
        thresholds = mc.Thresholds(linear=1.0, cnn=0.9, lstm=1.2, critic=1.0)
        plan = mc.analyze(policy.core, data, mc.CollapseConfig(thresholds=thresholds), SPEC)
        mc.collapse(policy.core, plan) if select == "cosine" else mc.ablate(policy.core, plan, seed=1)
    report = mc.refit(policy.core, original, plan, data)
    fitted = {layer["name"] for layer in report["layers"]}
    assert {"lstm1", "lstm2", "value", "action_query_weight"} <= fitted
    assert report["kept_merged"] == []
    for layer in report["layers"]:
        assert layer["residual_refit"] <= layer["residual_applied"] * (1 + 1e-9) + 1e-12, layer


def test_the_basis_refuses_too_few_samples():
    policy = random_policy()
    with pytest.raises(mc.CollapseError, match=r"at least 1000 samples"):
        mc.select_basis(policy.core, core_data(policy, 1, 1), SPEC)


def test_on_an_exactly_symmetric_network_the_basis_is_the_exact_fibration():
    base, big, _ = planted_mlp(3)
    x = torch.randn(4000, 6)
    exact = mc.analyze(big, x, EXACT)
    original = copy.deepcopy(big)
    plan, kept, _ = mc.select_basis(big, (x,), rank_tol=mc.RankTol(linear=0.001))
    assert [layer.width_after for layer in plan.layers] == [layer.width_after for layer in exact.layers] == [5, 7, 3]
    for layer, exact_layer in zip(plan.layers[:2], exact.layers, strict=False):  # one unit kept per fiber
        assert len(set(np.asarray(exact_layer.partition)[kept[layer.key]])) == layer.width_after
    mc.keep(big, plan, kept)
    mc.refit(big, original, plan, (x,))
    assert relative_error(big(x).detach(), base(x).detach()) < 1e-4


def test_a_parameter_budget_is_never_exceeded_and_lstm_widths_follow_the_data():
    torch.manual_seed(0)
    widths = dict(SMALL, cnn1=16, cnn2=16, fc1=32, encoded_obs=32, lstm1=24, lstm2=24, actor_1=32, critic_1=32)
    policy = FastPolicy(FastCore(24, 11, 11, 5, widths), 11, 11, torch.ones(24))
    data = core_data(policy, 32, 40)

    def lstm_widths(plan: mc.CollapsePlan) -> list[int]:
        return [layer.width_after for layer in plan.layers if layer.kind == "lstm"]

    kept_lstm = {}
    for fraction in (0.6, 0.3):
        plan, kept, chosen = mc.select_basis(policy.core, data, SPEC, params=fraction)
        assert plan.kept_fraction <= fraction
        assert {key: len(units) for key, units in kept.items()} == {
            layer.key: layer.width_after for layer in plan.layers if layer.key in kept
        }
        assert chosen["scale"] > 0
        kept_lstm[fraction] = lstm_widths(plan)
    assert all(small < large < 24 for small, large in zip(kept_lstm[0.3], kept_lstm[0.6], strict=True))
    # at one tolerance, the same number of samples of one observation repeated spans far fewer directions
    one = tokens(1, 1).expand(32, 40, -1, -1)
    poor = (policy.box(one.reshape(-1, *one.shape[2:])), *data[1:])
    rich_plan, poor_plan = (mc.select_basis(policy.core, d, SPEC)[0] for d in (data, poor))
    assert all(p < r / 2 for p, r in zip(lstm_widths(poor_plan), lstm_widths(rich_plan), strict=True))


def test_a_parameter_budget_takes_the_allocation_its_judge_prefers_within_the_budget():
    policy = random_policy()
    data = mc.live.Data(fit=core_data(policy, 32, 40), report=None, select=core_data(policy, 32, 40, seed=1))
    sizer = mc.live.Sizer(policy.core, data, SPEC, mc.CollapseConfig(metric="basis"))
    judged = []

    def lstm_units(scale: float) -> int:
        return sum(layer.width_after for layer in sizer.plan(scale)[0].layers if layer.kind == "lstm")

    def change(scale: float) -> float:  # a judge that prefers wide LSTMs
        judged.append((lstm_units(scale), sizer.config.rank_tol))
        return -lstm_units(scale)

    scale = sizer.allocate(lambda plan: plan.kept_fraction <= 0.3, "budget.params=0.3", change)
    plan, _, knob = sizer.plan(scale)
    assert plan.kept_fraction <= 0.3 and len({units for units, _ in judged}) > 1
    assert lstm_units(scale) == max(units for units, _ in judged)
    assert sizer.config.rank_tol.lstm < mc.RankTol().lstm  # the halved LSTM tolerance won
    assert knob["rank_tol"] == sizer.config.rank_tol.scaled(scale)

    def narrow_cnn(scale: float) -> float:  # a judge that prefers narrow convolutions
        return sum(layer.width_after for layer in sizer.plan(scale)[0].layers if layer.kind == "cnn")

    sizer.config = mc.CollapseConfig(metric="basis")
    sizer.allocate(lambda plan: plan.kept_fraction <= 0.3, "budget.params=0.3", narrow_cnn, factors=(0.5, 4.0))
    assert sizer.config.rank_tol.cnn == 4 * mc.RankTol().cnn  # one kind times 4 takes most of the cut
