"""The Metta adapter: its own logic on plain-torch stand-ins of Metta's `fast` policies (always), Metta itself
when importable."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import metta_collapse as mc
from metta_collapse.integrations import metta as adapter

REPO = Path(__file__).resolve().parents[2]
ERA = adapter.detect_era()
needs_metta = pytest.mark.skipif(ERA is None, reason="Metta is not importable here (no Metta checkout installed)")


class Holder(nn.Module):
    """A TensorDictModule's place in the module tree: the layer under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class Encoder(nn.Module):
    def __init__(self, channels: int = 24):
        super().__init__()
        self.cnn1 = nn.Conv2d(channels, 64, 5, stride=3)
        self.cnn2 = nn.Conv2d(64, 64, 3)
        self.fc1 = nn.Linear(64, 128)
        self.encoded_obs = nn.Linear(128, 128)

    def forward(self, box: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.cnn2(torch.relu(self.cnn1(box))))
        return torch.relu(self.encoded_obs(torch.relu(self.fc1(torch.flatten(x, 1)))))


class CurrentFast(nn.Module):
    """Layer names and shapes of the current `FastPolicy`; its Cortex core stood in for by one LSTM."""

    def __init__(self):
        super().__init__()
        self.cnn_encoder = Encoder()
        self.core = nn.LSTM(128, 128, batch_first=True)
        self.actor_1 = Holder(nn.Linear(128, 512))
        self.critic_1 = Holder(nn.Linear(128, 1024))
        self.value_head = Holder(nn.Linear(1024, 1))
        self.gtd_aux = Holder(nn.Linear(1024, 1))
        self.actor_logits = Holder(nn.Linear(512, 9))

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.core(self.cnn_encoder(box).unsqueeze(1))[0].squeeze(1)
        critic = torch.tanh(self.critic_1.module(core))
        return self.actor_logits.module(torch.relu(self.actor_1.module(core))), self.value_head.module(critic)


class SeptemberPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        enc = Encoder()
        self.cnn1, self.cnn2, self.fc1, self.encoded_obs = enc.cnn1, enc.cnn2, enc.fc1, enc.encoded_obs
        self.critic_1 = nn.Linear(128, 1024)
        self.value_head = nn.Linear(1024, 1)
        self.actor_1 = nn.Linear(128, 512)
        self.actor_W = nn.Parameter(torch.randn(1, 512, 16) / 20)


class SeptemberFast(nn.Module):
    """Layer names and shapes of September's `pytorch/fast` (an LSTMWrapper): `policy.*`, a 2-layer `lstm`."""

    def __init__(self):
        super().__init__()
        self.policy = SeptemberPolicy()
        self.lstm = nn.LSTM(128, 128, num_layers=2)
        self.hidden_size, self.num_layers = 128, 2
        self.lstm_h: dict = {0: torch.zeros(2, 4, 128)}
        self.lstm_c: dict = {0: torch.zeros(2, 4, 128)}

    def reset_memory(self) -> None:
        self.lstm_h.clear()
        self.lstm_c.clear()

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.policy
        x = torch.relu(p.cnn2(torch.relu(p.cnn1(box))))
        x = torch.relu(p.encoded_obs(torch.relu(p.fc1(torch.flatten(x, 1)))))
        hidden = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        query = torch.tanh(torch.relu(p.actor_1(hidden)) @ p.actor_W[0])
        return query, p.value_head(torch.tanh(p.critic_1(hidden)))


def plant(model: nn.Module, skip: tuple[str, ...]) -> nn.Module:
    """Every unit of every hidden layer copied once (odd rows := even rows): an exact fibration halves them."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in skip:
                continue
            if isinstance(module, nn.Linear | nn.Conv2d) and module.weight.shape[0] > 16:
                module.weight[1::2] = module.weight[0::2]
                module.bias[1::2] = module.bias[0::2]
            if isinstance(module, nn.LSTM):
                for tensor in (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0):
                    gates = tensor.view(4, module.hidden_size, *tensor.shape[1:])
                    gates[:, 1::2] = gates[:, 0::2]
    return model


def adam_with_state(model: nn.Module) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = sum(p.square().sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    return optimizer


SECTION = adapter.section_class(BaseModel)
BOX = torch.rand(12, 24, 11, 11)


def exact() -> BaseModel:
    return SECTION(metric="exact")


def recent(era: str, model: nn.Module) -> dict[str, torch.Tensor]:
    inputs = adapter.RecentInputs(model, adapter.ENTRIES[era])
    with torch.no_grad():
        model(BOX)
    inputs.remove()
    return inputs.tensors


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    return params, state, groups, [type(m) for m in model.modules()]


def widths(record: dict) -> dict[str, int]:
    return {layer["name"]: layer["width_after"] for layer in record["layers"]}


def test_current_chain_is_analysed_and_collapsed_exactly():
    torch.manual_seed(0)
    model = plant(CurrentFast(), skip=("core",))
    optimizer = adam_with_state(model)
    reference = model(BOX)
    record = adapter.collapse_agent(model, optimizer, "current", exact(), recent("current", model))
    got = widths(record)
    assert {k: got[k] for k in ("cnn_encoder.cnn1", "cnn_encoder.cnn2", "cnn_encoder.fc1")} == {
        "cnn_encoder.cnn1": 32,
        "cnn_encoder.cnn2": 32,
        "cnn_encoder.fc1": 64,
    }
    assert got["actor_1.module"] == 256 and got["critic_1.module"] == 512
    assert got["cnn_encoder.encoded_obs"] == 128  # feeds the undescribed core
    assert model.actor_1.module.weight.shape == (256, 128)
    assert record["kl_max"] < 1e-6 and record["value_err"] < 1e-5
    after = model(BOX)
    assert torch.allclose(after[0], reference[0], atol=1e-5) and torch.allclose(after[1], reference[1], atol=1e-5)
    assert all(p in optimizer.state for p in model.parameters())


def test_september_chain_collapses_and_updates_the_lstm_wrapper():
    torch.manual_seed(1)
    model = SeptemberFast()
    plant(model, skip=())
    with torch.no_grad():  # plant the first LSTM layer only: the layers get different widths and become a stack
        for name in ("weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"):
            getattr(model.lstm, name).normal_(0, 0.1)
    optimizer = adam_with_state(model)
    reference = model(BOX)
    record = adapter.collapse_agent(model, optimizer, "september", exact(), recent("september", model))
    got = widths(record)
    assert got["policy.cnn1"] == 32 and got["policy.fc1"] == 64 and got["policy.critic_1"] == 512
    assert got["policy.actor_1"] == 512  # feeds the 3-d bilinear head
    assert isinstance(model.lstm, mc.LSTMStack) and [m.hidden_size for m in model.lstm.layers] == [64, 128]
    assert (model.hidden_size, model.num_layers) == (192, 1)
    assert model.lstm_h == {} and model.lstm_c == {}
    after = model(BOX)
    assert torch.allclose(after[0], reference[0], atol=1e-5) and torch.allclose(after[1], reference[1], atol=1e-5)
    assert record["params_after"] < record["params_before"]


def test_chain_of_the_wrong_policy_is_refused_with_the_supported_one():
    with pytest.raises(mc.CollapseError, match="pytorch/fast"):
        adapter.find_fast(CurrentFast(), "september")


class StandInComponentBase:
    """What the component uses of Metta's TrainerComponent."""

    def __init__(self, epoch_interval: int = 1):
        self.epoch_interval = epoch_interval

    def register(self, context: object) -> None:
        self.context = context


def test_failure_in_the_component_leaves_policy_and_optimizer_untouched(monkeypatch: pytest.MonkeyPatch, caplog):
    torch.manual_seed(2)
    policy = plant(CurrentFast(), skip=("core",))
    optimizer = adam_with_state(policy)
    context = SimpleNamespace(policy=policy, optimizer=optimizer, epoch=0, agent_step=0)
    wandb_run = SimpleNamespace(logged=[], log=lambda values: wandb_run.logged.append(values), summary={})
    component = adapter.component_class(StandInComponentBase)(
        adapter.CollapseHook(SECTION(epoch_idx=3, metric="exact"), "current", wandb_run)
    )
    component.register(context)
    policy(BOX)
    component.on_epoch_end(2)
    before = snapshot(policy, optimizer)

    def broken(*args: object, **kwargs: object) -> None:  # fails after the policy has been rewritten
        raise RuntimeError("injected")

    monkeypatch.setattr("metta_collapse.live.remap_optimizer", broken)
    with pytest.raises(adapter.CollapseFailed, match="unchanged.*injected"):
        component.on_epoch_end(3)
    after = snapshot(policy, optimizer)
    assert before[2:] == after[2:] and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[0].keys() == after[0].keys()
    for pid, state in before[1].items():
        assert all(torch.equal(v, after[1][pid][k]) for k, v in state.items())
    assert "COLLAPSE FAILED" in caplog.text and wandb_run.logged == [{"collapse/failed": 1.0}]
    component.on_epoch_end(4)  # reported once, never retried on a half-known state
    assert getattr(policy, adapter.MARKER, None) is None


def test_component_collapses_once_at_epoch_idx_and_logs_the_record():
    torch.manual_seed(3)
    policy = plant(CurrentFast(), skip=("core",))
    optimizer = adam_with_state(policy)
    context = SimpleNamespace(policy=policy, optimizer=optimizer, epoch=0, agent_step=1000)
    logged: list = []
    wandb_run = SimpleNamespace(log=logged.append, summary={})
    component = adapter.component_class(StandInComponentBase)(
        adapter.CollapseHook(SECTION(epoch_idx=2, metric="exact"), "current", wandb_run)
    )
    component.register(context)
    component.on_epoch_end(2)  # no forward pass yet: waits
    policy(BOX)
    component.on_epoch_end(2)
    record = getattr(policy, adapter.MARKER)
    assert record["epoch"] == 2 and logged[0]["collapse/params_after"] == record["params_after"]
    assert logged[0]["collapse/width_after/actor_1.module"] == 256
    component.on_epoch_end(3)
    assert len(logged) == 1 and not policy.cnn_encoder.cnn1._forward_pre_hooks


class StandInLossBase:
    """What the loss uses of September's BaseLoss."""

    def __init__(self, policy: nn.Module, trainer_cfg: object, vec_env: object, device: object, *args: object):
        self.policy, self.loss_cfg, self.loss_tracker = policy, args[-1], {}

    def on_new_training_run(self, trainer_state: object) -> None:
        pass

    def on_rollout_start(self, trainer_state: object) -> None:
        pass

    def on_train_phase_end(self, trainer_state: object) -> None:
        pass


def test_september_loss_collapses_at_epoch_idx_and_never_twice_after_a_resume():
    import pickle
    from collections import defaultdict

    torch.manual_seed(4)
    agent = plant(SeptemberFast(), skip=())
    optimizer = adam_with_state(agent)
    config = SimpleNamespace(section=SECTION(epoch_idx=4, metric="exact"))
    loss = adapter.loss_class(StandInLossBase)(agent, None, None, "cpu", None, "collapse", config)
    loss.loss_tracker = defaultdict(list)
    state = SimpleNamespace(epoch=3, agent_step=10, optimizer=optimizer)
    loss.on_new_training_run(state)
    loss.on_rollout_start(state)
    agent(BOX)
    assert agent.policy.cnn1._forward_pre_hooks
    loss.on_train_phase_end(state)
    assert not agent.policy.cnn1._forward_pre_hooks  # a checkpoint never pickles the hooks
    state.epoch = 5  # update_epochs=2: epoch 4 never comes, `>=` catches 5
    loss.on_new_training_run(state)
    assert getattr(agent, adapter.MARKER)["epoch"] == 5 and loss.loss_tracker["collapse_params_after"]
    assert agent.num_layers == 1 and agent.hidden_size == agent.lstm.hidden_size
    resumed = pickle.loads(pickle.dumps(agent))
    again = adapter.loss_class(StandInLossBase)(resumed, None, None, "cpu", None, "collapse", config)
    shapes = [p.shape for p in resumed.parameters()]
    again.on_new_training_run(SimpleNamespace(epoch=8, agent_step=20, optimizer=torch.optim.Adam(resumed.parameters())))
    assert [p.shape for p in resumed.parameters()] == shapes


# ----- the recipe's override paths and the era


class StandInConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


def walk(root: BaseModel, path: str, value: object) -> None:
    """Metta's override walker, in short: getattr through Config objects, validate the leaf."""
    *parents, leaf = path.split(".")
    target = root
    for name in parents:
        target = getattr(target, name)
        assert isinstance(target, StandInConfig), f"{name} is not a Config: Metta's override walker would refuse it"
    field = type(target).model_fields[leaf]
    from pydantic import TypeAdapter

    setattr(target, leaf, TypeAdapter(field.annotation).validate_python(value))


OVERRIDES = {
    "collapse.epoch_idx": 300,
    "collapse.thresholds.lstm": 1.5,
    "collapse.thresholds.linear": 0.2,
    "collapse.thresholds.cnn": 0.3,
    "collapse.thresholds.critic": 0.4,
    "collapse.metric": "exact",
    "collapse.mode": "random_ablation",
    "collapse.optimizer_state": "reset",
    "collapse.seed": 7,
    "collapse.enabled": False,
}


def test_the_recipe_has_the_same_override_paths_in_both_runtimes(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("mettagrid")
    monkeypatch.syspath_prepend(str(REPO))
    from metta_collapse.training.config import apply_override

    section = adapter.section_class(StandInConfig)
    tool = create_tool(section)
    embedded = importlib.import_module("experiments.recipes.collapse_arena").train("x")
    for path, value in OVERRIDES.items():
        walk(tool, path, value)
        apply_override(embedded, path, str(value))
    assert tool.collapse.model_dump() == {
        k: v for k, v in embedded.collapse.model_dump().items() if k in tool.collapse.model_dump()
    }
    embedded_fields = type(embedded.collapse).model_fields
    for name, field in type(tool.collapse).model_fields.items():
        assert name in embedded_fields and field.default == embedded_fields[name].default, name
    assert adapter.engine_config(tool.collapse) == embedded.collapse.engine_config()


def create_tool(section: type) -> BaseModel:
    from pydantic import Field, create_model

    return create_model("Tool", __base__=StandInConfig, collapse=(section, Field(default_factory=section)))()


def test_bad_section_values_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match="epoch_idx"):
        SECTION(epoch_idx=-1)
    with pytest.raises(ValueError, match="lstm"):
        SECTION(thresholds={"lstm": 3.0})


def test_era_detection(monkeypatch: pytest.MonkeyPatch):
    found = {"metta.rl.training.component": "current", "metta.rl.loss.base_loss": "september"}
    for module, era in found.items():
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, m=module: object() if name == m else None)
        assert adapter.detect_era() == era

    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert adapter.detect_era() is None


def test_without_metta_the_recipe_is_the_embedded_one(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("mettagrid")
    if ERA is not None:
        pytest.skip("Metta is importable: the recipe is Metta's")
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("experiments.recipes.collapse_arena", None)
    recipe = importlib.import_module("experiments.recipes.collapse_arena")
    from metta_collapse.training.collapse import CollapseTrainTool

    assert isinstance(recipe.train("r"), CollapseTrainTool) and recipe.RUNTIME == "embedded"


@needs_metta
def test_inside_metta_the_recipe_builds_metta_train_tool_with_the_section():
    sys.path.insert(0, str(REPO))
    recipe = importlib.import_module("experiments.recipes.collapse_arena")
    tool = recipe.train("c1")
    for path, value in OVERRIDES.items():
        tool.override(path, value)
    assert tool.collapse.epoch_idx == 300 and tool.collapse.thresholds.lstm == 1.5
    assert recipe.RUNTIME == ERA
