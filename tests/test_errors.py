"""Bad input fails with an error naming the problem, before anything is changed."""

import warnings

import pydantic
import pytest
import torch
from test_planted import EXACT, mlp, planted_mlp
from torch import nn

import metta_collapse as mc


@pytest.mark.parametrize("field, value", [("linear", 3.0), ("cnn", -0.1), ("critic", float("nan"))])
def test_threshold_outside_range_names_the_field(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        mc.CollapseConfig(thresholds={field: value})


def test_unknown_metric_is_rejected():
    with pytest.raises(pydantic.ValidationError, match="metric"):
        mc.CollapseConfig(metric="euclid")


def test_nan_weights_name_the_parameter():
    net = mlp([4, 8, 2])
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(mc.CollapseError, match="'2.weight'"):
        mc.analyze(net, torch.randn(2, 4))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_model_names_the_construct():
    with pytest.raises(mc.CollapseError, match=r"Branchy at .*test_errors.py:\d+ `if x.sum\(\) > 0:`"):
        mc.analyze(Branchy(), torch.randn(2, 4))


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=1))


def test_unknown_op_is_a_barrier_with_a_warning_or_an_error_in_strict_mode():
    net = Unknown()
    with torch.no_grad():
        net.fc1.weight[8:] = net.fc1.weight[:8]
        net.fc1.bias[8:] = net.fc1.bias[:8]
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="node 'cumsum' .*cumsum.* barrier"):
        plan = mc.analyze(net, x, EXACT)
    assert plan.layers[0].width_after == 16  # would be 8 without the barrier
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(mc.CollapseError, match="node 'cumsum'.*strict"):
        mc.analyze(net, x, mc.CollapseConfig(metric="exact", strict=True))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_known_ops_raise_no_warning():
    _, big, _ = planted_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc.analyze(big, torch.randn(2, 6), mc.CollapseConfig(metric="exact", strict=True))


def test_a_plan_applied_to_another_model_fails_before_changing_it():
    _, big, _ = planted_mlp()
    plan = mc.analyze(big, torch.randn(2, 6), EXACT)
    mc.collapse(big, plan)
    weights = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(mc.CollapseError, match="already collapsed"):
        mc.collapse(big, plan)
    assert all(torch.equal(weights[k], v) for k, v in big.state_dict().items())


def test_analyze_is_pure():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    mc.analyze(net, torch.randn(16, 4) * 5 + 3)
    assert net.training and net[1].training
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_spec_naming_a_missing_input_fails():
    with pytest.raises(mc.CollapseError, match="'obs'"):
        mc.analyze(mlp([4, 2]), torch.randn(1, 4), spec=mc.ModelSpec(inputs={"obs": mc.InputSpec()}))
