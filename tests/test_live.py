"""Collapsing a live training state: policy, Adam state and packed recurrent-state buffers together."""

import math

import pytest
import torch
from planted import expand_fast

import metta_collapse as mc
from metta_collapse import live
from metta_collapse.training.policy import DEFAULT_WIDTHS, FastCore, FastPolicy

SMALL = dict(DEFAULT_WIDTHS, cnn1=6, cnn2=5, fc1=8, encoded_obs=7, lstm1=4, lstm2=6, actor_1=9, critic_1=10)
SPEC = mc.ModelSpec(
    inputs={"box": mc.InputSpec(axis=1), **{n: mc.InputSpec(role="state") for n in ("h1", "c1", "h2", "c2")}},
    outputs=["logits", "value", "state", "state", "state", "state"],
)


def tokens(batch: int, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 11, (batch, steps, 40, 2), generator=g)
    feature = torch.randint(0, 24, (batch, steps, 40, 1), generator=g)
    value = torch.randint(1, 10, (batch, steps, 40, 1), generator=g)
    return torch.cat([coords[..., :1] * 16 + coords[..., 1:], feature, value], dim=-1).to(torch.uint8)


def trained_planted(copies: int = 2):
    torch.manual_seed(0)
    base = FastPolicy(FastCore(24, 11, 11, 5, SMALL), 11, 11, torch.ones(24))
    policy = expand_fast(base, copies)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    observations = tokens(4, 6)
    for _ in range(3):
        optimizer.zero_grad()
        logits, value = policy(observations, {})
        (value.square().mean() - torch.log_softmax(logits, -1)[:, 0].mean()).backward()
        optimizer.step()
    return base, policy, optimizer, observations


EXACT = mc.CollapseConfig(metric="exact")


def arguments(policy, optimizer, observations, buffers, config=EXACT):
    box = policy.box(observations.reshape(-1, *observations.shape[2:]))
    batch = observations.shape[0]
    states = [torch.zeros(batch, policy.core.lstm1.hidden_size)] * 2 + [
        torch.zeros(batch, policy.core.lstm2.hidden_size)
    ] * 2
    packed = [live.PackedState(buffers, "lstm_h", ["h1", "h2"]), live.PackedState(buffers, "lstm_c", ["c1", "c2"])]
    return dict(
        policy=policy,
        target="core",
        data=live.Data(fit=(box, *states), report=lambda p, _: p(observations, {})),
        spec=SPEC,
        config=config,
        optimizer=optimizer,
        buffers=packed,
    )


def test_exact_collapse_of_a_trained_planted_policy_keeps_its_behaviour():
    base, policy, optimizer, observations = trained_planted()
    buffers = {"lstm_h": torch.randn(3, policy.hidden_size), "lstm_c": torch.randn(3, policy.hidden_size)}
    plan, record = live.collapse_live(**arguments(policy, optimizer, observations, buffers))
    widths = {layer["name"]: layer["width_after"] for layer in record["layers"]}
    assert widths == {
        "cnn1": 6,
        "cnn2": 5,
        "fc1": 8,
        "encoded_obs": 7,
        "lstm1": 4,
        "lstm2": 6,
        "critic_1": 10,
        "value": 1,
        "actor_1": 9,
        "action_query_weight": 16,
        "action_embeddings": 16,
    }
    assert record["params_after"] == sum(p.numel() for p in base.parameters()) < record["params_before"]
    assert record["kl_max"] <= 1e-6 and record["value_err"] <= 1e-5
    assert buffers["lstm_h"].shape == (3, 10) and policy.hidden_size == 10
    logits, _ = policy(observations, {"lstm_h": buffers["lstm_h"], "lstm_c": buffers["lstm_c"]})
    assert torch.isfinite(logits).all()
    optimizer.zero_grad()
    policy(observations, {})[1].sum().backward()
    optimizer.step()


@pytest.mark.parametrize("mode", ["random_ablation", "scratch"])
def test_null_models_have_the_collapse_parameter_count(mode):
    _, policy, optimizer, observations = trained_planted()
    buffers = {"lstm_h": torch.randn(3, policy.hidden_size), "lstm_c": torch.randn(3, policy.hidden_size)}
    _, collapsed = live.collapse_live(**arguments(*trained_planted()[1:3], observations, dict(buffers)))
    _, record = live.collapse_live(**arguments(policy, optimizer, observations, buffers), mode=mode, seed=3)
    assert record["params_after"] == collapsed["params_after"]
    assert [layer["width_after"] for layer in record["layers"]] == [
        layer["width_after"] for layer in collapsed["layers"]
    ]
    if mode == "scratch":
        assert all(len(optimizer.state[p]) == 0 for p in policy.parameters())


def test_a_failure_inside_the_live_collapse_changes_nothing(monkeypatch):
    _, policy, optimizer, observations = trained_planted()
    buffers = {"lstm_h": torch.randn(3, policy.hidden_size), "lstm_c": torch.randn(3, policy.hidden_size)}
    saved_buffers = dict(buffers)
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    params = list(policy.parameters())
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(live, "behaviour_change", broken)  # fails after the model, optimizer and buffers changed
    for mode in ("fibration", "scratch"):
        with pytest.raises(RuntimeError, match="injected"):
            live.collapse_live(**arguments(policy, optimizer, observations, buffers), mode=mode)
        assert all(buffers[k] is saved_buffers[k] for k in buffers)
        assert list(policy.parameters()) == params and optimizer.param_groups[0]["params"] == params
        assert all(torch.equal(weights[k], v) for k, v in policy.state_dict().items())
        assert all(torch.equal(optimizer.state[p][k], v) for p in params for k, v in state[id(p)].items())
        assert policy.hidden_size == buffers["lstm_h"].shape[1]


def test_the_record_costs_each_layer_as_the_network_of_its_widths():
    base, policy, optimizer, observations = trained_planted()
    buffers = {"lstm_h": torch.zeros(3, policy.hidden_size), "lstm_c": torch.zeros(3, policy.hidden_size)}
    _, record = live.collapse_live(**arguments(policy, optimizer, observations, buffers))
    layers = {layer["name"]: layer for layer in record["layers"]}
    for name in ("cnn1", "cnn2", "fc1", "encoded_obs", "lstm1", "lstm2", "critic_1", "actor_1"):
        params = sum(p.numel() for p in base.core.get_submodule(name).parameters())
        assert layers[name]["params_before"] > layers[name]["params_after"] == params, name
    lstm, critic = base.core.lstm1, base.core.critic_1
    assert layers["lstm1"]["macs_after"] == 4 * lstm.hidden_size * (lstm.input_size + lstm.hidden_size)
    assert layers["critic_1"]["macs_after"] == critic.in_features * critic.out_features
    _, base_cost, _ = live.cost(base, lambda p, _: p(observations, {}), None)
    assert record["macs_per_step_after"] == base_cost["macs_per_step"] < record["macs_per_step_before"]
    assert record["seconds_per_step_before"] > 0 and record["seconds_per_step_after"] > 0


def textbook_macs(policy: FastPolicy, observations: torch.Tensor) -> float:
    """Multiply-adds per agent step of a `fast` policy by the textbook formulas, from its layers' shapes and
    outputs (not FlopCounterMode, which the engine uses)."""
    total = 0

    def count(layer: torch.nn.Module, inputs: tuple, output) -> None:
        nonlocal total
        if isinstance(layer, torch.nn.Conv2d):
            total += output.numel() * layer.in_channels * math.prod(layer.kernel_size)
        elif isinstance(layer, torch.nn.Linear):
            total += output.numel() * layer.in_features
        elif isinstance(layer, torch.nn.LSTM):
            h = layer.hidden_size
            total += output[0].shape[:-1].numel() * 4 * h * (layer.input_size + h)

    hooks = [m.register_forward_hook(count) for m in policy.modules()]
    with torch.no_grad():
        policy(observations, {})
    for hook in hooks:
        hook.remove()
    core, steps = policy.core, observations.shape[:2].numel()
    query, actions = core.action_query_weight.shape, core.action_embeddings.weight.shape[0]
    return total / steps + math.prod(query) + query[1] * actions  # the two bare matrix products of the head


@pytest.mark.parametrize("metric", ["basis", "cosine"])
def test_a_multiply_add_budget_holds_on_the_network_built_at_the_kept_widths(metric):
    torch.manual_seed(0)
    widths = dict(SMALL, cnn1=16, cnn2=16, fc1=32, encoded_obs=32, lstm1=24, lstm2=24, actor_1=32, critic_1=32)
    policy = FastPolicy(FastCore(24, 11, 11, 5, widths), 11, 11, torch.ones(24))
    observations = tokens(32, 40)
    buffers = {"lstm_h": torch.zeros(3, policy.hidden_size), "lstm_c": torch.zeros(3, policy.hidden_size)}
    optimizer = torch.optim.Adam(policy.parameters())
    before = textbook_macs(policy, observations)
    config = mc.CollapseConfig(metric=metric)
    arguments_ = arguments(policy, optimizer, observations, buffers, config)
    _, record = live.collapse_live(**arguments_, budget=mc.Budget(macs=0.3))
    kept = {layer["name"]: layer["width_after"] for layer in record["layers"]}
    built = FastPolicy(
        FastCore(24, 11, 11, 5, dict(SMALL, **{k: kept[k] for k in widths if k in kept})), 11, 11, torch.ones(24)
    )
    after = textbook_macs(built, observations)
    assert after <= 0.3 * before
    assert (record["macs_per_step_before"], record["macs_per_step_after"]) == (round(before), round(after))
    assert kept["cnn1"] < widths["cnn1"]  # the encoder, most of the multiply-adds, is collapsed too


def test_a_multiply_add_budget_collapses_the_planted_encoder_exactly():
    base, policy, optimizer, observations = trained_planted()
    observations = tokens(40, 40)
    buffers = {"lstm_h": torch.zeros(3, policy.hidden_size), "lstm_c": torch.zeros(3, policy.hidden_size)}
    fraction = textbook_macs(base, observations) / textbook_macs(policy, observations)
    config = mc.CollapseConfig(metric="basis")
    _, record = live.collapse_live(
        **arguments(policy, optimizer, observations, buffers, config), budget=mc.Budget(macs=fraction)
    )
    kept = {layer["name"]: layer["width_after"] for layer in record["layers"]}
    assert (kept["cnn1"], kept["cnn2"]) == (SMALL["cnn1"], SMALL["cnn2"])  # each channel's copy merged, no more
    assert record["macs_per_step_after"] <= fraction * record["macs_per_step_before"]
    assert record["kl_max"] <= 1e-6
