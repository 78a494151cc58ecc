"""The Metta adapter: its own logic on plain-torch stand-ins of Metta's `fast` policies (always), Metta itself
when importable."""

import copy
import importlib
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import metta_collapse as mc
from metta_collapse.integrations import current, fast, september
from metta_collapse.integrations import hook as hooks
from metta_collapse.integrations import metta as adapter

REPO = Path(__file__).resolve().parents[2]
ERA = adapter.detect_era()
needs_metta = pytest.mark.skipif(ERA is None, reason="Metta is not importable here (no Metta checkout installed)")
needs_current = pytest.mark.skipif(ERA != "current", reason="needs current-era Metta (a8d1ece) importable")
needs_september = pytest.mark.skipif(ERA != "september", reason="needs September Metta (b712df1) importable")


class Holder(nn.Module):
    """A TensorDictModule's place in the module tree: the layer under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class EncoderConfig(BaseModel):
    """The fields of Metta's CNNEncoderConfig that set widths."""

    cnn1_cfg: dict = {"out_channels": 64, "kernel_size": 5, "stride": 3}
    cnn2_cfg: dict = {"out_channels": 64, "kernel_size": 3, "stride": 1}
    fc1_cfg: dict = {"out_features": 128}
    encoded_obs_cfg: dict = {"out_features": 128}


class FastConfig(BaseModel):
    """The fields of Metta's FastConfig that set widths; Metta's checkpoint spec is its dump."""

    cnn_encoder_config: EncoderConfig = EncoderConfig()
    critic_hidden_dim: int = 1024
    actor_hidden_dim: int = 512


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig | None = None, channels: int = 24):
        super().__init__()
        config = config or EncoderConfig()
        self.cnn1 = nn.Conv2d(channels, **config.cnn1_cfg)
        self.cnn2 = nn.Conv2d(config.cnn1_cfg["out_channels"], **config.cnn2_cfg)
        self.fc1 = nn.Linear(config.cnn2_cfg["out_channels"], config.fc1_cfg["out_features"])
        self.encoded_obs = nn.Linear(config.fc1_cfg["out_features"], config.encoded_obs_cfg["out_features"])

    def forward(self, box: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.cnn2(torch.relu(self.cnn1(box))))
        return torch.relu(self.encoded_obs(torch.relu(self.fc1(torch.flatten(x, 1)))))


class CellConfig(BaseModel):
    hidden_size: int


class Cortex(nn.Module):
    """What the adapter uses of Metta's `CortexTD`: its LSTM at `stack.blocks.0.experts.0.cell.net` (batch
    first, called from the state (h, c) at each step), the cell's width, and its per-environment state stores
    (rows, layers, hidden)."""

    def __init__(self, width: int = 128):
        super().__init__()
        cell = nn.Module()
        cell.net, cell.hidden_size, cell.cfg = (
            nn.LSTM(128, width, batch_first=True),
            width,
            CellConfig(hidden_size=width),
        )
        expert, block = nn.Module(), nn.Module()
        expert.cell, block.experts = cell, nn.ModuleList([expert])
        self.stack = nn.Module()
        self.stack.blocks = nn.ModuleList([block])
        self._rollout_store_leaves = [torch.randn(5, 1, width), torch.randn(5, 1, width)]  # h and c of 5 slots
        self._row_store_leaves: list[torch.Tensor] = []
        self._rollout_current_state = None
        self._leaf_shapes = [(1, width), (1, width)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.blocks[0].experts[0].cell.net(x.unsqueeze(1))[0].squeeze(1)


class CurrentFast(nn.Module):
    """Layer names and shapes of the current `FastPolicy`, built from its config; its Cortex core stood in for
    by one LSTM at Cortex's path."""

    def __init__(self, config: FastConfig | None = None):
        super().__init__()
        config = config or FastConfig()
        self.cnn_encoder = Encoder(config.cnn_encoder_config)
        self.core = Cortex()
        self.actor_1 = Holder(nn.Linear(128, config.actor_hidden_dim))
        self.critic_1 = Holder(nn.Linear(128, config.critic_hidden_dim))
        self.value_head = Holder(nn.Linear(config.critic_hidden_dim, 1))
        self.gtd_aux = Holder(nn.Linear(config.critic_hidden_dim, 1))
        self.actor_logits = Holder(nn.Linear(config.actor_hidden_dim, 9))

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.core(self.cnn_encoder(box))
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
        self.actor_bias = nn.Parameter(torch.randn(1))
        self.action_embeddings = nn.Embedding(100, 16)
        self.num_active_actions = 9


class LSTMWrapper(nn.Module):
    """September's LSTM holders: a 2-layer nn.LSTM under `attribute`, its sizes, per-environment memory."""

    def __init__(self, attribute: str):
        super().__init__()
        setattr(self, attribute, nn.LSTM(128, 128, num_layers=2))
        self.hidden_size, self.num_layers = 128, 2
        self.lstm_h: dict = {0: torch.zeros(2, 4, 128)}
        self.lstm_c: dict = {0: torch.zeros(2, 4, 128)}

    def reset_memory(self) -> None:
        self.lstm_h.clear()
        self.lstm_c.clear()

    def step(self, lstm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One step from the memory of the same batch (zero state otherwise), as Metta's rollouts run it."""
        state = (self.lstm_h.get(0), self.lstm_c.get(0))
        fits = state[0] is not None and state[0].shape[1] == x.shape[0]
        output, (h, c) = lstm(x.unsqueeze(0), state if fits else None)
        self.lstm_h[0], self.lstm_c[0] = h.detach(), c.detach()
        return output.squeeze(0)


class SeptemberFast(LSTMWrapper):
    """Layer names and shapes of September's `pytorch/fast` (an LSTMWrapper): `policy.*`, a 2-layer `lstm`."""

    def __init__(self):
        super().__init__("lstm")
        self.policy = SeptemberPolicy()

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.policy
        x = torch.relu(p.cnn2(torch.relu(p.cnn1(box))))
        x = torch.relu(p.encoded_obs(torch.relu(p.fc1(torch.flatten(x, 1)))))
        hidden = self.step(self.lstm, x)
        query = torch.tanh(torch.relu(p.actor_1(hidden)) @ p.actor_W[0])
        logits = query @ p.action_embeddings.weight[: p.num_active_actions].T + p.actor_bias
        return logits, p.value_head(torch.tanh(p.critic_1(hidden)))


class Layer(nn.Module):
    """A ComponentPolicy layer: its weight layer (and nonlinearity) under `_net`, the weight layer also in
    `weight_net` outside the module tree, and the L2-init anchor `initial_weights`."""

    def __init__(self, weight: nn.Module, nonlinearity: nn.Module | None = None):
        super().__init__()
        self._net = weight if nonlinearity is None else nn.Sequential(weight, nonlinearity)
        self.__dict__["weight_net"] = weight
        self.initial_weights = weight.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)


class ActionEmbeds(nn.Module):
    def __init__(self):
        super().__init__()
        self._net = nn.Embedding(100, 16)
        self.register_buffer("active_indices", torch.arange(1, 10))


class ComponentFast(nn.Module):
    """Layer names and shapes of September's component `fast` (the study's policy)."""

    def __init__(self):
        super().__init__()
        enc = Encoder()
        self.components = nn.ModuleDict(
            {
                "cnn1": Layer(enc.cnn1, nn.ReLU()),
                "cnn2": Layer(enc.cnn2, nn.ReLU()),
                "fc1": Layer(enc.fc1, nn.ReLU()),
                "encoded_obs": Layer(enc.encoded_obs, nn.ReLU()),
                "_core_": LSTMWrapper("_net"),
                "critic_1": Layer(nn.Linear(128, 1024), nn.Tanh()),
                "_value_": Layer(nn.Linear(1024, 1)),
                "actor_1": Layer(nn.Linear(128, 512), nn.ReLU()),
                "actor_query": nn.Module(),
                "_action_embeds_": ActionEmbeds(),
                "_action_": nn.Module(),
            }
        )
        self.components.actor_query.W = nn.Parameter(torch.randn(512, 16) / 20)
        self.components._action_.bias = nn.Parameter(torch.randn(1))

    def forward(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.components
        x = c.encoded_obs(c.fc1(torch.flatten(c.cnn2(c.cnn1(box)), 1)))
        hidden = c._core_.step(c._core_._net, x)
        query = torch.tanh(torch.einsum("b h, h e -> b e", c.actor_1(hidden), c.actor_query.W))
        keys = c._action_embeds_._net(c._action_embeds_.active_indices)
        return query @ keys.T + c._action_.bias, c._value_(c.critic_1(hidden))


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


def rollouts(era: str, model: nn.Module, fit_steps: int = 6, box: torch.Tensor = BOX, passes: int = 1):
    """What the adapter records of `passes` rollout forward passes (no gradients) of boxes like `box`."""
    prefix, layout = fast.find_fast(model, era)
    recording = hooks.Rollouts(layout, fit_steps, agents_per_env=24)
    recording.watch(model.get_submodule(prefix), layout)
    with torch.no_grad():
        for index in range(passes):
            model(box if index == 0 else torch.rand_like(box))
    model(box)  # a training pass (with gradients) is not recorded
    recording.unwatch()
    return recording


def filled(
    era: str, model: nn.Module, inputs: dict[str, torch.Tensor], fit_steps: int = 6, core: str = "shrink"
) -> hooks.Rollouts:
    """Rollouts holding `inputs` (entry name -> rows); an LSTM's state at zero."""
    prefix, layout = fast.find_fast(model, era, core)
    recording = hooks.Rollouts(layout, fit_steps)
    rows = next(iter(inputs.values())).shape[0]
    layers = 0 if layout.lstm is None else model.get_submodule(prefix).get_submodule(layout.lstm).num_layers
    states = {} if layout.lstm is None else dict.fromkeys(("h", "c"), torch.zeros(layers, rows, 128))
    recording.add(inputs | states)
    return recording


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    return params, state, groups, [type(m) for m in model.modules()]


def widths(record: dict) -> dict[str, int]:
    return {layer["name"]: layer["width_after"] for layer in record["layers"]}


@pytest.mark.parametrize("core", ["shrink", "stock"])
def test_current_chain_is_analysed_and_collapsed_exactly(core: str):
    torch.manual_seed(0)
    model = plant(CurrentFast(), skip=())
    stores = [leaf.clone() for leaf in model.core._rollout_store_leaves]
    optimizer = adam_with_state(model)
    reference = model(BOX)
    section = SECTION(metric="exact", core=core)
    recording = hooks.Rollouts(fast.find_fast(model, "current", core)[1], 6, agents_per_env=24)
    recording.watch(model, fast.find_fast(model, "current", core)[1])
    with torch.no_grad():
        model(BOX)
    record = hooks.collapse_agent(model, optimizer, "current", section, recording)
    got = widths(record)
    assert {k: got[k] for k in ("cnn_encoder.cnn1", "cnn_encoder.cnn2", "cnn_encoder.fc1")} == {
        "cnn_encoder.cnn1": 32,
        "cnn_encoder.cnn2": 32,
        "cnn_encoder.fc1": 64,
    }
    assert got["actor_1.module"] == 256 and got["critic_1.module"] == 512
    cell = model.core.stack.blocks[0].experts[0].cell
    if core == "shrink":  # the core's LSTM halves; its cell, stored states and the heads follow
        assert got["cnn_encoder.encoded_obs"] == 64 and got[fast.CORTEX_LSTM] == 64
        assert cell.net.weight_ih_l0.shape == (256, 64) and cell.hidden_size == cell.cfg.hidden_size == 64
        assert model.actor_1.module.weight.shape == (256, 64) and model.core._leaf_shapes == [(1, 64), (1, 64)]
        for old, new in zip(stores, model.core._rollout_store_leaves, strict=True):
            assert torch.allclose(new, (old[..., 0::2] + old[..., 1::2]) / 2)  # each fiber's mean
    else:  # the core is the chain's input: it and what feeds it keep their width
        assert got["cnn_encoder.encoded_obs"] == 128 and fast.CORTEX_LSTM not in got
        assert model.actor_1.module.weight.shape == (256, 128) and cell.hidden_size == 128
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
    record = hooks.collapse_agent(model, optimizer, "september", exact(), rollouts("september", model))
    got = widths(record)
    assert got["policy.cnn1"] == 32 and got["policy.fc1"] == 64 and got["policy.critic_1"] == 512
    assert got["policy.actor_1"] == 512  # feeds the 3-d bilinear head
    assert isinstance(model.lstm, mc.RecurrentStack) and [m.hidden_size for m in model.lstm.layers] == [64, 128]
    assert (model.hidden_size, model.num_layers) == (192, 1)
    assert model.lstm_h == {} and model.lstm_c == {}
    assert record["kl_max"] < 1e-6 and record["value_err"] < 1e-4  # KL of the bilinear head's logits; float32
    after = model(BOX)
    assert torch.allclose(after[0], reference[0], atol=1e-5) and torch.allclose(after[1], reference[1], atol=1e-5)
    assert record["params_after"] < record["params_before"]


def test_component_fast_collapses_actor_1_and_keeps_its_layers_consistent():
    torch.manual_seed(5)
    model = plant(ComponentFast(), skip=())
    with torch.no_grad():  # the LSTM's second layer unplanted: the layers get different widths, a stack
        for name in ("weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"):
            getattr(model.components._core_._net, name).normal_(0, 0.1)
    optimizer = adam_with_state(model)
    reference = model(BOX)
    record = hooks.collapse_agent(model, optimizer, "september", exact(), rollouts("september", model))
    got = widths(record)
    assert got["components.cnn1._net.0"] == 32 and got["components.fc1._net.0"] == 64
    assert got["components.actor_1._net.0"] == 256 and got["components.critic_1._net.0"] == 512
    core = model.components._core_
    assert isinstance(core._net, mc.RecurrentStack) and [m.hidden_size for m in core._net.layers] == [64, 128]
    assert (core.hidden_size, core.num_layers) == (192, 1) and core.lstm_h == {} and core.lstm_c == {}
    for name, layer in model.components.items():
        if "weight_net" in vars(layer):
            net = layer._net[0] if isinstance(layer._net, nn.Sequential) else layer._net
            assert layer.weight_net is net and layer.initial_weights.shape == net.weight.shape, name
    assert record["kl_max"] < 1e-6 and record["value_err"] < 1e-5  # KL of the real action logits
    after = model(BOX)
    assert torch.allclose(after[0], reference[0], atol=1e-5) and torch.allclose(after[1], reference[1], atol=1e-5)
    sum(output.square().sum() for output in model(BOX)).backward()
    optimizer.step()  # training goes on with the remapped state


def test_current_checkpoint_reloads_from_the_synced_architecture_and_never_collapses_twice():
    torch.manual_seed(6)
    config = FastConfig()
    policy = plant(CurrentFast(config), skip=("core",))
    context = SimpleNamespace(policy=policy, optimizer=adam_with_state(policy), epoch=0, agent_step=0)
    # the stand-in config cannot describe a narrow core (NarrowFastConfig does: the Metta test below)
    section = SECTION(epoch_idx=1, metric="exact", fit_steps=6, core="stock")
    component = current.component_class(StandInComponentBase)(hooks.CollapseHook(section, "current"), config)
    component.register(context)
    assert config == FastConfig()  # nothing to write before the collapse
    with torch.no_grad():
        policy(BOX)
    component.on_epoch_end(1)
    assert config.actor_hidden_dim == 256 and config.critic_hidden_dim == 512
    assert config.cnn_encoder_config.cnn1_cfg == {"out_channels": 32, "kernel_size": 5, "stride": 3}
    assert config.cnn_encoder_config.encoded_obs_cfg == {"out_features": 128}
    assert FastConfig().actor_hidden_dim == 512 and EncoderConfig().cnn1_cfg["out_channels"] == 64
    # Metta's checkpoint: the config's dump (its spec) and the weights, loaded strictly into a rebuilt policy
    reloaded = CurrentFast(FastConfig.model_validate_json(config.model_dump_json()))
    reloaded.load_state_dict(policy.state_dict(), strict=True)
    # the resumed run: the recipe's architecture again, the policy from the collapsed checkpoint
    resumed_config = FastConfig()
    resumed = current.component_class(StandInComponentBase)(hooks.CollapseHook(section, "current"), resumed_config)
    resumed.register(SimpleNamespace(policy=reloaded, optimizer=adam_with_state(reloaded), epoch=1, agent_step=0))
    assert resumed_config == config
    shapes = [p.shape for p in reloaded.parameters()]
    reloaded(BOX)
    resumed.on_epoch_end(2)
    assert [p.shape for p in reloaded.parameters()] == shapes


def test_chain_of_the_wrong_policy_is_refused_with_the_supported_one():
    with pytest.raises(mc.CollapseError, match="pytorch/fast"):
        fast.find_fast(CurrentFast(), "september")


class StandInComponentBase:
    """What the component uses of Metta's TrainerComponent."""

    def __init__(self, epoch_interval: int = 1):
        self.epoch_interval = epoch_interval

    def register(self, context: object) -> None:
        self.context = context


def metta_fast_policy(core: str = "shrink") -> tuple[nn.Module, BaseModel, dict[str, torch.Tensor]]:
    """Metta's own FastPolicy for the arena (as the train tool builds it for `collapse.core`), its FastConfig,
    and inputs for its chain's entries."""
    from metta.agent.policies.fast import FastConfig as MettaFastConfig
    from mettagrid.policy.policy_env_interface import PolicyEnvInterface
    from recipes.prod.arena_basic_easy_shaped import mettagrid

    env_info = PolicyEnvInterface.from_mg_cfg(mettagrid())
    architecture = MettaFastConfig()
    if core == "shrink":
        architecture = current.narrow_architecture(architecture)
    policy = architecture.make_policy(env_info)
    box = torch.rand(64, policy.cnn_encoder.cnn1.in_channels, env_info.obs_height, env_info.obs_width)
    inputs = {"box": box} if core == "shrink" else {"box": box, "core": torch.randn(64, 128)}
    return policy, architecture, inputs


@pytest.mark.parametrize("where", ["stand-in", pytest.param("metta", marks=needs_current)])
def test_failure_in_the_component_leaves_policy_and_optimizer_untouched(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog
):
    torch.manual_seed(2)
    if where == "metta":
        import schedulefree
        from metta.rl.training.component import TrainerComponent

        policy, architecture, inputs = metta_fast_policy()
        optimizer = schedulefree.AdamWScheduleFree(policy.parameters(), lr=1e-3)  # Metta's default optimizer
        optimizer.train()
        sum(p.square().sum() for p in policy.parameters()).backward()
        optimizer.step()
        thresholds = {"linear": 1.5, "critic": 1.5}
        base, section = TrainerComponent, SECTION(epoch_idx=3, metric="cosine", thresholds=thresholds, fit_steps=6)
    else:
        policy, architecture, inputs = plant(CurrentFast(), skip=("core",)), FastConfig(), {}
        optimizer = adam_with_state(policy)
        base, section = StandInComponentBase, SECTION(epoch_idx=3, metric="exact", fit_steps=6)
    context = SimpleNamespace(policy=policy, optimizer=optimizer, epoch=0, agent_step=0)
    wandb_run = SimpleNamespace(logged=[], log=lambda values: wandb_run.logged.append(values), summary={})
    hook = hooks.CollapseHook(section, "current", wandb_run)
    component = current.component_class(base)(hook, architecture)
    component.register(context)
    component.on_epoch_end(2)  # too early to collapse; from here on the rollouts are recorded
    if inputs:
        hook.rollouts = filled("current", policy, inputs)
    else:
        with torch.no_grad():
            policy(BOX)
    before = snapshot(policy, optimizer)
    spec = architecture.model_dump()

    def broken(*args: object, **kwargs: object) -> None:  # fails after the policy has been rewritten
        raise RuntimeError("injected")

    monkeypatch.setattr("metta_collapse.live.remap_optimizer", broken)
    monkeypatch.setattr(hooks.log, "handlers", [caplog.handler])  # Metta's logging setup bypasses the root's
    with pytest.raises(hooks.CollapseFailed, match="unchanged.*injected"):
        component.on_epoch_end(3)
    after = snapshot(policy, optimizer)
    assert before[2:] == after[2:] and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[0].keys() == after[0].keys()
    for pid, state in before[1].items():
        assert all(torch.equal(v, after[1][pid][k]) for k, v in state.items())
    assert architecture.model_dump() == spec
    assert "COLLAPSE FAILED" in caplog.text and wandb_run.logged == [{"collapse/failed": 1.0}]
    component.on_epoch_end(4)  # reported once, never retried on a half-known state
    assert getattr(policy, hooks.MARKER, None) is None


def test_component_collapses_once_at_epoch_idx_and_logs_the_record():
    torch.manual_seed(3)
    policy = plant(CurrentFast(), skip=("core",))
    optimizer = adam_with_state(policy)
    context = SimpleNamespace(policy=policy, optimizer=optimizer, epoch=0, agent_step=1000)
    logged: list = []
    wandb_run = SimpleNamespace(log=logged.append, summary={})
    component = current.component_class(StandInComponentBase)(
        hooks.CollapseHook(SECTION(epoch_idx=2, metric="exact", fit_steps=6), "current", wandb_run)
    )
    component.register(context)
    component.on_epoch_end(2)  # no rollout yet: waits
    policy(BOX)  # a training pass: not data for the collapse
    component.on_epoch_end(2)
    assert getattr(policy, hooks.MARKER, None) is None
    with torch.no_grad():
        policy(BOX)
    component.on_epoch_end(2)
    record = getattr(policy, hooks.MARKER)
    assert record["epoch"] == 2 and logged[0]["collapse/params_after"] == record["params_after"]
    assert logged[0]["collapse/width_after/actor_1.module"] == 256
    component.on_epoch_end(3)
    assert len(logged) == 1 and not policy.cnn_encoder.cnn1._forward_pre_hooks


def test_component_refuses_an_unknown_policy_at_registration_only_when_collapsing():
    other = nn.Sequential(nn.Linear(4, 4))
    context = SimpleNamespace(policy=other, optimizer=None, epoch=0, agent_step=0)
    for enabled in (False, True):
        hook = hooks.CollapseHook(SECTION(enabled=enabled), "current")
        component = current.component_class(StandInComponentBase)(hook, FastConfig())
        if enabled:
            with pytest.raises(mc.CollapseError, match="holds no fast"):
                component.register(context)
        else:
            component.register(context)


def test_settings_that_break_an_in_place_collapse_are_refused_before_training(monkeypatch: pytest.MonkeyPatch):
    tool = SimpleNamespace(collapse=SECTION(), trainer=SimpleNamespace(compile=True))
    with pytest.raises(ValueError, match="trainer.compile"):
        adapter.refuse_unsupported(tool)
    tool.trainer.compile = False
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(adapter, "detect_era", lambda: "current")
    adapter.refuse_unsupported(tool)  # every process collapses its replica (test_metta_distributed.py)
    monkeypatch.setattr(adapter, "detect_era", lambda: "september")
    with pytest.raises(ValueError, match="8 processes.*September.*collapse.enabled=false"):
        adapter.refuse_unsupported(tool)
    tool.collapse.enabled = False
    adapter.refuse_unsupported(tool)
    monkeypatch.undo()
    beyond = SECTION(metric="cosine")
    beyond.thresholds.lstm = 3  # as Metta's override check lets it through: the leaf's type only
    with pytest.raises(ValueError, match="collapse.thresholds.lstm=3: Input should be less than or equal to 2"):
        adapter.refuse_unsupported(SimpleNamespace(collapse=beyond, trainer=tool.trainer))
    for section, message in (
        (SECTION(metric="cosine", rank_tol={"lstm": 0.1}), "collapse.rank_tol.* is not a knob of collapse.metric"),
        (SECTION(budget={"params": 0.5}, rank_tol={"lstm": 0.1}), "size is set twice"),
        (SECTION(fit_steps=500), "at least 1000"),
    ):
        with pytest.raises(ValueError, match=message):
            adapter.refuse_unsupported(SimpleNamespace(collapse=section, trainer=tool.trainer))


class StandInLossBase:
    """What the loss uses of September's BaseLoss."""

    def __init__(self, policy: nn.Module, trainer_cfg: object, vec_env: object, device: object, *args: object):
        self.policy, self.loss_cfg, self.loss_tracker = policy, args[-1], defaultdict(list)

    def on_new_training_run(self, trainer_state: object) -> None:
        pass

    def on_rollout_start(self, trainer_state: object) -> None:
        pass

    def on_train_phase_end(self, trainer_state: object) -> None:
        pass


def test_september_loss_collapses_at_epoch_idx_and_never_twice_after_a_resume():
    import pickle

    torch.manual_seed(4)
    agent = plant(SeptemberFast(), skip=())
    optimizer = adam_with_state(agent)
    config = SimpleNamespace(section=SECTION(epoch_idx=4, metric="exact", fit_steps=6))
    loss = september.loss_class(StandInLossBase)(agent, None, None, "cpu", None, "collapse", config)
    state = SimpleNamespace(epoch=3, agent_step=10, optimizer=optimizer)
    loss.on_new_training_run(state)
    loss.on_rollout_start(state)
    with torch.no_grad():
        agent(BOX)
    assert agent.policy.cnn1._forward_pre_hooks
    loss.on_train_phase_end(state)
    assert not agent.policy.cnn1._forward_pre_hooks  # a checkpoint never pickles the hooks
    state.epoch = 5  # update_epochs=2: epoch 4 never comes, `>=` catches 5
    loss.on_new_training_run(state)
    assert getattr(agent, hooks.MARKER)["epoch"] == 5 and loss.loss_tracker["collapse_params_after"]
    assert agent.num_layers == 1 and agent.hidden_size == agent.lstm.hidden_size
    resumed = pickle.loads(pickle.dumps(agent))
    again = september.loss_class(StandInLossBase)(resumed, None, None, "cpu", None, "collapse", config)
    shapes = [p.shape for p in resumed.parameters()]
    again.on_new_training_run(SimpleNamespace(epoch=8, agent_step=20, optimizer=torch.optim.Adam(resumed.parameters())))
    assert [p.shape for p in resumed.parameters()] == shapes


def september_agent(name: str) -> tuple[nn.Module, torch.Tensor]:
    """b712df1's MettaAgent with the named policy, on the arena recipe's environment, and a box for its input."""
    from metta.agent.agent_config import AgentConfig
    from metta.agent.metta_agent import MettaAgent
    from metta.cogworks.curriculum.curriculum import Curriculum
    from metta.rl.system_config import SystemConfig
    from metta.rl.vecenv import make_vecenv

    from experiments.recipes import arena_basic_easy_shaped

    curriculum = Curriculum(arena_basic_easy_shaped.train().trainer.curriculum)
    vecenv = make_vecenv(curriculum, "serial", num_envs=1, batch_size=1, num_workers=1, is_training=True)
    vecenv.async_reset(0)
    env = vecenv.driver_env
    agent = MettaAgent(env, SystemConfig(device="cpu", vectorization="serial"), AgentConfig(name=name))
    features = env.get_observation_features()
    agent.initialize_to_environment(features, env.action_names, env.max_action_args, torch.device("cpu"))
    prefix, layout = fast.find_fast(agent, "september")
    channels = agent.get_submodule(prefix).get_submodule(layout.entries["box"]).in_channels
    return agent, torch.rand(64, channels, env.obs_height, env.obs_width)


@pytest.mark.parametrize(
    "where",
    [
        "stand-in",
        *(pytest.param(name, marks=needs_september) for name in ("fast", "pytorch/fast")),
    ],
)
def test_failure_in_the_september_loss_leaves_agent_and_optimizer_untouched(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog
):
    torch.manual_seed(8)
    if where == "stand-in":
        agent, box, base = plant(ComponentFast(), skip=()), BOX, StandInLossBase
    else:
        from metta.rl.loss.base_loss import BaseLoss

        (agent, box), base = september_agent(where), BaseLoss
    optimizer = adam_with_state(agent)
    config = SimpleNamespace(section=SECTION(epoch_idx=1, metric="cosine", fit_steps=6))
    loss = september.loss_class(base)(agent, None, None, "cpu", None, "collapse", config)
    loss.hook.rollouts = filled("september", agent, {"box": box})  # what the loss's hooks record
    before = snapshot(agent, optimizer)
    memory = [vars(m).get("lstm_h") for m in agent.modules() if "lstm_h" in vars(m)]

    def broken(*args: object, **kwargs: object) -> None:  # fails after the agent has been rewritten
        raise RuntimeError("injected")

    monkeypatch.setattr("metta_collapse.live.remap_optimizer", broken)
    monkeypatch.setattr(hooks.log, "handlers", [caplog.handler])
    loss.on_new_training_run(SimpleNamespace(epoch=1, agent_step=0, optimizer=optimizer))  # training goes on
    after = snapshot(agent, optimizer)
    assert before[2:] == after[2:] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for pid, state in before[1].items():
        assert all(torch.equal(v, after[1][pid][k]) for k, v in state.items())
    assert [vars(m).get("lstm_h") for m in agent.modules() if "lstm_h" in vars(m)] == memory
    assert "COLLAPSE FAILED" in caplog.text and loss.loss_tracker["collapse_failed"] == [1.0]
    assert getattr(agent, hooks.MARKER, None) is None


@needs_september
@pytest.mark.parametrize("name", ["fast", "pytorch/fast"])
def test_inside_september_metta_the_collapsed_agent_is_pickled_with_its_record(name: str, tmp_path: Path):
    from metta.rl.loss.base_loss import BaseLoss

    torch.manual_seed(9)
    agent, box = september_agent(name)
    config = SimpleNamespace(section=SECTION(epoch_idx=1, metric="cosine", fit_steps=6))
    loss = september.loss_class(BaseLoss)(agent, None, None, "cpu", None, "collapse", config)
    loss.hook.rollouts = filled("september", agent, {"box": box})
    loss.on_new_training_run(SimpleNamespace(epoch=1, agent_step=0, optimizer=adam_with_state(agent)))
    record = getattr(agent, hooks.MARKER)
    assert record["params_after"] == sum(p.numel() for p in agent.parameters()) < record["params_before"]
    torch.save(agent, tmp_path / "agent.pt")  # September checkpoints pickle the whole agent
    loaded = torch.load(tmp_path / "agent.pt", weights_only=False)
    assert getattr(loaded, hooks.MARKER) == record
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in agent.parameters()]
    prefix, layout = fast.find_fast(loaded, "september")
    root = loaded.get_submodule(prefix)
    lstm, wrapper = root.get_submodule(layout.lstm), root.get_submodule(layout.lstm.rpartition(".")[0])
    assert (wrapper.hidden_size, wrapper.num_layers) == (lstm.hidden_size, lstm.num_layers)


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
    "collapse.rank_tol.lstm": 0.05,
    "collapse.budget.params": 0.3,
    "collapse.refit": False,
    "collapse.fit_steps": 2048,
    "collapse.mode": "random_ablation",
    "collapse.optimizer_state": "reset",
    "collapse.seed": 7,
    "collapse.enabled": False,
}


@pytest.mark.skipif(ERA is not None, reason="inside Metta the embedded runtime (PyPI mettagrid 0.26) is not importable")
def test_the_recipe_has_the_same_override_paths_in_both_runtimes(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("mettagrid")
    monkeypatch.syspath_prepend(str(REPO / "src"))
    from metta_collapse.training.config import apply_override

    section = adapter.section_class(StandInConfig)
    tool = create_tool(section)
    embedded = importlib.import_module("experiments.recipes.collapse_arena").train("x")
    for path, value in OVERRIDES.items():
        walk(tool, path, value)
        apply_override(embedded, path, str(value))
    assert tool.collapse.model_dump(exclude={"core"}) == {
        k: v for k, v in embedded.collapse.model_dump().items() if k in tool.collapse.model_dump()
    }
    embedded_fields = type(embedded.collapse).model_fields
    for name, field in type(tool.collapse).model_fields.items():
        if name == "core":  # current Metta's Cortex core; the embedded policy's LSTMs always collapse
            continue
        assert name in embedded_fields and field.default == embedded_fields[name].default, name
        if field.default_factory is not None:
            assert field.default_factory().model_dump() == embedded_fields[name].default_factory().model_dump(), name
    assert hooks.engine_config(tool.collapse) == embedded.collapse.engine_config()


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
    monkeypatch.syspath_prepend(str(REPO / "src"))
    sys.modules.pop("experiments.recipes.collapse_arena", None)
    recipe = importlib.import_module("experiments.recipes.collapse_arena")
    from metta_collapse.training.collapse import CollapseTrainTool

    assert isinstance(recipe.train("r"), CollapseTrainTool) and recipe.RUNTIME == "embedded"


@needs_metta
def test_inside_metta_the_recipe_builds_metta_train_tool_with_the_section(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "src"))
    recipe = importlib.import_module("experiments.recipes.collapse_arena")
    tool = recipe.train()
    for path, value in OVERRIDES.items():
        tool.override(path, value)
    assert tool.collapse.epoch_idx == 300 and tool.collapse.thresholds.lstm == 1.5
    assert recipe.RUNTIME == ERA
    if ERA == "current":  # the baseline at the same path: the same Metta recipe, never collapsed
        baseline = importlib.import_module("experiments.recipes.arena_basic_easy_shaped").train()
        assert not baseline.collapse.enabled and type(baseline.policy_architecture) is type(tool.policy_architecture)


@needs_current
@pytest.mark.parametrize("core", ["shrink", "stock"])
def test_inside_metta_a_collapsed_fast_policy_reloads_strictly_from_its_checkpoint_spec(core: str):
    from metta.agent.policy import PolicyArchitecture
    from metta.rl.training.component import TrainerComponent
    from mettagrid.policy.policy_env_interface import PolicyEnvInterface
    from recipes.prod.arena_basic_easy_shaped import mettagrid

    torch.manual_seed(7)
    policy, architecture, inputs = metta_fast_policy(core)
    thresholds = {"linear": 1.5, "cnn": 1.5, "lstm": 1.0, "critic": 1.5}
    section = SECTION(epoch_idx=1, metric="cosine", thresholds=thresholds, fit_steps=6, core=core)
    hook = hooks.CollapseHook(section, "current")
    component = current.component_class(TrainerComponent)(hook, architecture)
    component.register(SimpleNamespace(policy=policy, optimizer=adam_with_state(policy), epoch=0, agent_step=0))
    hook.rollouts = filled("current", policy, inputs, core=core)
    component.on_epoch_end(1)
    record = getattr(policy, hooks.MARKER)
    assert record["params_after"] < record["params_before"]
    assert architecture.actor_hidden_dim == policy.actor_1.module.out_features < 512
    env_info = PolicyEnvInterface.from_mg_cfg(mettagrid())
    rebuilt = PolicyArchitecture.from_spec(architecture.to_spec()).make_policy(env_info)
    rebuilt.load_state_dict(policy.state_dict(), strict=True)
    lstm = rebuilt.get_submodule(fast.CORTEX_LSTM)
    assert (lstm.hidden_size < 128) == (core == "shrink")
    assert (
        lstm.input_size == rebuilt.cnn_encoder.encoded_obs.out_features == policy.cnn_encoder.encoded_obs.out_features
    )


@needs_current
@pytest.mark.parametrize("size", ["params", "macs"])
def test_inside_metta_the_sweep_searches_override_paths_of_the_train_tool(size: str):
    recipe = importlib.import_module("experiments.recipes.collapse_arena")
    sweep = recipe.sweep("cs1", size=size)
    assert (sweep.recipe_module, sweep.train_entrypoint) == ("experiments.recipes.collapse_arena", "train")
    searched = {f"collapse.budget.{size}", "collapse.epoch_fraction"}
    assert set(sweep.search_space) == set(mc.config.sweep_space(size)) == searched
    tool = recipe.train()
    for path, parameter in sweep.search_space.items():  # what a trial does: `./tools/run.py ... path=value`
        tool.override(path, parameter.max)
    adapter.refuse_unsupported(tool)  # one knob: a trial runs
    adapter.apply_epoch_fraction(tool)
    epochs = -(-tool.trainer.total_timesteps // tool.trainer.batch_size)
    assert getattr(tool.collapse.budget, size) == sweep.search_space[f"collapse.budget.{size}"].max
    assert 1 <= tool.collapse.epoch_idx < epochs  # every trial collapses inside its own agent steps


def test_a_september_stand_in_keeps_its_lstms_at_a_quarter_of_the_parameters():
    """The study's policy with every gate bias at 1 (September's init): its default thresholds leave one unit per
    LSTM layer; a basis of its activations at budget.params=0.25 keeps at least 8, and the refit beats the
    plain cut on the same data."""
    pytest.importorskip("mettagrid")
    from metta_collapse.training.policy import tokens_to_box

    torch.manual_seed(0)
    model = ComponentFast()
    with torch.no_grad():
        for name, tensor in model.components._core_._net.named_parameters():
            if name.startswith("bias"):
                tensor.fill_(1.0)
    prefix, layout = fast.find_fast(model, "september")
    chain = layout.chain(model.get_submodule(prefix))
    g = torch.Generator().manual_seed(1)
    coords = torch.randint(0, 11, (2048, 40, 2), generator=g)
    tokens = torch.cat([coords[..., :1] * 16 + coords[..., 1:], torch.randint(0, 24, (2048, 40, 2), generator=g)], -1)
    box = tokens_to_box(tokens.to(torch.uint8), torch.full((24,), 0.1), 11, 11, -1, 0)
    zeros = torch.zeros(2, 2048, 128)  # every row one step of its own sequence, as the trainer's rows come
    data = (box, zeros, zeros)
    lstm = ("components._core_._net.l0", "components._core_._net.l1")
    cosine = mc.analyze(chain, data, mc.CollapseConfig(), layout.spec)
    assert [layer.width_after for layer in cosine.layers if layer.name in lstm] == [1, 1]
    plan, kept, _ = mc.select_basis(chain, data, layout.spec, params=0.25)
    assert plan.kept_fraction <= 0.25
    assert all(layer.width_after >= 8 for layer in plan.layers if layer.name in lstm)
    original, plain = copy.deepcopy(chain), copy.deepcopy(chain)
    mc.keep(plain, plan, kept)
    mc.keep(chain, plan, kept)
    mc.refit(chain, original, plan, data)
    small = (box, *(mc.map_state(plan, name, zeros, kept) for name in ("h", "c")))
    with torch.no_grad():
        reference, refitted, merged = original(*data)[1], chain(*small)[1], plain(*small)[1]
    assert (refitted - reference).abs().max() < (merged - reference).abs().max()


@pytest.mark.parametrize(
    ("era", "make"), [("current", CurrentFast), ("september", ComponentFast), ("september", SeptemberFast)]
)
def test_on_the_adapters_rollouts_the_refit_changes_the_policy_less_than_the_plain_merge(era: str, make: type):
    torch.manual_seed(10)
    model = make()
    box = torch.rand(96, 24, 11, 11)  # 4 environment copies of 24 agents a pass
    recording = rollouts(era, model, fit_steps=1200, box=box, passes=25)
    assert recording.ready() and not recording.by_agent
    assert recording.counts["fit"] == 1200 and recording.counts["report"] == 600
    sections = {
        "plain": SECTION(metric="cosine", refit=False, budget={"params": 0.5}),
        "refit": SECTION(metric="cosine", budget={"params": 0.5}),
        "default": SECTION(budget={"params": 0.5}),
    }
    kl = {}
    for name, section in sections.items():
        trial = copy.deepcopy(model)
        record = hooks.collapse_agent(trial, torch.optim.Adam(trial.parameters()), era, section, recording)
        assert record["params_after"] < record["params_before"] and "environment copy" in record["measured_on"]
        assert record["refit"] == (name != "plain") and record["metric"] == section.metric
        kl[name] = record["kl_mean"]
    assert kl["refit"] < kl["plain"] and kl["default"] < kl["plain"], kl


@pytest.mark.parametrize(
    ("era", "make"), [("current", CurrentFast), ("september", ComponentFast), ("september", SeptemberFast)]
)
def test_in_both_eras_a_multiply_add_budget_holds_and_narrows_the_encoder(era: str, make: type):
    torch.manual_seed(10)
    model = make()
    recording = rollouts(era, model, fit_steps=1200, box=torch.rand(96, 24, 11, 11), passes=25)
    record = hooks.collapse_agent(
        model, torch.optim.Adam(model.parameters()), era, SECTION(budget={"macs": 0.5}), recording
    )
    assert record["macs_per_step_after"] <= 0.5 * record["macs_per_step_before"]
    convolutions = [layer for layer in record["layers"] if layer["kind"] == "cnn"]
    assert convolutions and any(layer["width_after"] < layer["width_before"] for layer in convolutions)


@pytest.mark.parametrize(
    ("era", "make"), [("current", CurrentFast), ("september", ComponentFast), ("september", SeptemberFast)]
)
def test_in_both_eras_a_parameter_budget_bounds_the_whole_agent_and_the_record_costs_each_lstm_layer(
    era: str, make: type
):
    torch.manual_seed(10)
    model = make()
    recording = rollouts(era, model, fit_steps=1200, box=torch.rand(96, 24, 11, 11), passes=25)
    section = SECTION(budget={"params": 0.25})
    record = hooks.collapse_agent(model, torch.optim.Adam(model.parameters()), era, section, recording)
    assert record["params_after"] == sum(p.numel() for p in model.parameters()) <= 0.25 * record["params_before"]
    lstm = [layer for layer in record["layers"] if layer["kind"] == "lstm"]
    assert lstm and all(layer["params_after"] < layer["params_before"] for layer in lstm)  # never None
    assert all(layer["macs_after"] <= layer["params_after"] for layer in lstm)


@pytest.mark.parametrize(
    ("era", "make"), [("current", CurrentFast), ("september", ComponentFast), ("september", SeptemberFast)]
)
def test_the_adapter_keeps_each_pass_even_when_the_trainer_reuses_one_buffer(era: str, make: type):
    """Trainers write each step's observations into one buffer: what a part holds is every pass, not the last."""
    torch.manual_seed(0)
    model = make()
    prefix, layout = fast.find_fast(model, era)
    recording = hooks.Rollouts(layout, fit_steps=400, agents_per_env=24)
    recording.watch(model.get_submodule(prefix), layout)
    buffer, passes = torch.empty(96, 24, 11, 11), []
    with torch.no_grad():
        for _ in range(5):
            buffer.copy_(torch.rand_like(buffer))
            passes.append(buffer.clone())
            model(buffer)
    recording.unwatch()
    entry = next(iter(layout.entries))
    fit = recording.inputs("fit")[recording.names.index(entry)]
    # copies 0 and 1 of each pass go to fit (the parts cycle fit, fit, select, report by copy)
    expected = torch.cat([p[:48] for p in passes])
    if fit.shape == expected.shape:
        assert torch.equal(fit, expected)
    else:  # an entry past the box (the encoder's input): its rows still differ from pass to pass
        assert len({row.numpy().tobytes() for row in fit.reshape(5, 48, -1)}) == 5


def test_septembers_recipe_refuses_the_current_eras_sweep_evaluation_in_one_line(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    import metta_collapse.integrations

    monkeypatch.setattr(metta_collapse.integrations, "detect_era", lambda: "september")
    monkeypatch.setattr(adapter, "detect_era", lambda: "september")
    path = Path(importlib.import_module("experiments.recipes.collapse_arena").__file__)
    spec = importlib.util.spec_from_file_location("collapse_arena_in_september", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.RUNTIME == "september"
    with pytest.raises(NotImplementedError, match="this is september Metta") as refused:
        recipe.evaluate_in_sweep("file:///tmp/p.pt")
    assert "\n" not in str(refused.value)
    with pytest.raises(NotImplementedError, match="September: use the embedded one"):
        recipe.sweep("s")
