from pathlib import Path

import pytest
import torch
from torch import nn

from metta_collapse.training.arena import make_ascii_arena, make_env, make_small_arena
from metta_collapse.training.policy import (
    FastPolicy,
    architecture,
    build_policy,
    make_policy,
    tokens_to_box,
)


def token(row: int, col: int, feature: int, value: int) -> list[int]:
    return [row << 4 | col, feature, value]


def test_tokens_to_box_places_values_by_coordinates_and_feature():
    scale = torch.tensor([1.0, 0.5, 0.1, 1.0])
    tag = 3  # feature 3 carries object types: one-hot in channels 4 + type
    tokens = torch.tensor(
        [
            [
                token(2, 3, 1, 4),  # row 2, col 3 (byte 0x23)
                token(10, 0, 0, 7),  # bottom-left corner
                [0xFE, 2, 50],  # global token: the centre cell
                token(4, 4, tag, 1),  # an object of type 1
                token(0, 9, 5, 9),  # unknown feature id: dropped
                token(1, 1, tag, 2),  # unknown object type: dropped
                token(12, 1, 0, 3),  # outside the 11x11 window: dropped
                [0xFF, 0xFF, 0xFF],  # padding
                [0xFF, 0xFF, 0xFF],
            ],
            [token(0, 0, 0, 1), token(0, 0, tag, 0)] + [[0xFF, 0xFF, 0xFF]] * 7,
        ],
        dtype=torch.uint8,
    )
    box = tokens_to_box(tokens, scale, 11, 11, tag_feature=tag, num_tags=2)
    assert box.shape == (2, 6, 11, 11)
    expected = torch.zeros(2, 6, 11, 11)
    expected[0, 1, 2, 3] = 2.0
    expected[0, 0, 10, 0] = 7.0
    expected[0, 2, 5, 5] = 5.0
    expected[0, 4 + 1, 4, 4] = 1.0
    expected[1, 0, 0, 0] = 1.0
    expected[1, 4 + 0, 0, 0] = 1.0
    assert torch.equal(box, expected)


def test_box_from_the_environment_shows_objects_where_they_are():
    env = make_env(make_ascii_arena(["#####", "#m@g#", "#.a.#", "#####"]))
    obs, _ = env.reset()
    policy = make_policy(env)
    box = policy.box(torch.as_tensor(obs))
    id_map = env.env_cfg.game.id_map()
    tags = id_map.tag_names()
    num_features = len(id_map.features())
    assert box.shape == (1, num_features + len(tags), 11, 11)
    centre = 5

    def type_at(row: int, col: int) -> list[str]:
        return [tags[i] for i in box[0, num_features:, row, col].nonzero().flatten().tolist()]

    assert type_at(centre, centre) == ["type:agent"]
    assert type_at(centre, centre - 1) == ["type:mine_red"]
    assert type_at(centre, centre + 1) == ["type:generator_red"]
    assert type_at(centre + 1, centre) == ["type:altar"]
    assert type_at(centre - 1, centre) == ["type:wall"]
    assert box[0, id_map.feature_id("tag")].sum() == 0


def small_policy() -> FastPolicy:
    torch.manual_seed(0)
    return make_policy(make_env(make_small_arena()))


def test_core_traces_with_torch_fx_and_matches_eager():
    policy = small_policy()
    core = policy.core
    traced = torch.fx.symbolic_trace(core)
    batch, horizon = 3, 4
    box = torch.rand(batch * horizon, core.cnn1.in_channels, 11, 11)
    states = [torch.randn(batch, core.lstm1.hidden_size) for _ in range(2)]
    states += [torch.randn(batch, core.lstm2.hidden_size) for _ in range(2)]
    eager = core(box, *states)
    for a, b in zip(eager, traced(box, *states), strict=True):
        assert torch.allclose(a, b)
    logits, value, h1, c1, h2, c2 = eager
    assert logits.shape == (batch * horizon, 5) and value.shape == (batch * horizon, 1)
    assert h1.shape == c1.shape == (batch, 128) and h2.shape == c2.shape == (batch, 128)


def test_training_forward_equals_step_by_step_rollout():
    policy = small_policy()
    env = make_env(make_small_arena())
    obs, _ = env.reset()
    steps = []
    for _ in range(5):
        steps.append(torch.as_tensor(obs).clone())
        obs, *_ = env.step(torch.randint(0, 5, (env.num_agents,)).int().numpy())
    state = {"lstm_h": torch.zeros(env.num_agents, policy.hidden_size)}
    state["lstm_c"] = torch.zeros_like(state["lstm_h"])
    with torch.no_grad():
        step_logits = [policy.forward_eval(o, state)[0] for o in steps]
        logits, value = policy(torch.stack(steps, dim=1), {"lstm_h": None, "lstm_c": None})
    assert torch.allclose(logits.reshape(env.num_agents, 5, -1), torch.stack(step_logits, dim=1), atol=1e-5)
    assert value.shape == (env.num_agents, 5)
    assert policy.hidden_size == 256


def shrink_lstm1(policy: FastPolicy, width: int) -> None:
    """Keep the first `width` units of lstm1, in place (what a collapse does, crudely)."""
    core = policy.core
    old1, old2 = core.lstm1, core.lstm2
    gates = torch.cat([torch.arange(g * old1.hidden_size, g * old1.hidden_size + width) for g in range(4)])
    new1 = nn.LSTM(old1.input_size, width, batch_first=True)
    new2 = nn.LSTM(width, old2.hidden_size, batch_first=True)
    with torch.no_grad():
        new1.weight_ih_l0.copy_(old1.weight_ih_l0[gates])
        new1.weight_hh_l0.copy_(old1.weight_hh_l0[gates][:, :width])
        new1.bias_ih_l0.copy_(old1.bias_ih_l0[gates])
        new1.bias_hh_l0.copy_(old1.bias_hh_l0[gates])
        new2.load_state_dict(old2.state_dict() | {"weight_ih_l0": old2.weight_ih_l0[:, :width]})
    core.lstm1, core.lstm2 = new1, new2


def test_widths_are_read_live_and_a_shrunk_policy_rebuilds_from_its_architecture():
    policy = small_policy()
    shrink_lstm1(policy, 48)
    assert policy.hidden_size == 48 + 128
    arch = architecture(policy)
    assert arch["widths"]["lstm1"] == 48 and arch["widths"]["critic_1"] == 1024
    rebuilt = build_policy(arch)
    rebuilt.load_state_dict(policy.state_dict(), strict=True)
    tokens = torch.randint(0, 255, (6, 200, 3), dtype=torch.uint8)
    state = {"lstm_h": torch.zeros(6, 176), "lstm_c": torch.zeros(6, 176)}
    with torch.no_grad():
        assert torch.allclose(policy.forward_eval(tokens, dict(state))[0], rebuilt.forward_eval(tokens, state)[0])
    assert state["lstm_h"].shape == (6, 176)


def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_one_before_resumed(tmp_path: Path):
    from metta_collapse.training.checkpoint import resume_checkpoint, save_checkpoint

    policy = small_policy()
    optimizer = torch.optim.Adam(policy.parameters())
    good = save_checkpoint(tmp_path, "r", policy, optimizer, 1, 100, 1.0)
    for epoch, junk in ((2, b""), (3, b"not a checkpoint"), (4, good.read_bytes()[:500])):
        (tmp_path / good.name.replace("__e1__", f"__e{epoch}__")).write_bytes(junk)
    with pytest.warns(UserWarning, match="unreadable") as caught:
        path, checkpoint = resume_checkpoint(tmp_path, "r")
    assert path == good and checkpoint["epoch"] == 1 and len(caught) == 3
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == sorted(
        good.name.replace("__e1__", f"__e{epoch}__") + ".corrupt" for epoch in (2, 3, 4)
    )
    assert resume_checkpoint(tmp_path / "none", "r") == (None, None)
