"""Metta's `fast` policy (September 2025 layout) for PuffeRL.

`FastCore` is the part from the feature box to the heads; it has no data-dependent branching so that
`torch.fx.symbolic_trace` can analyse it as is. `FastPolicy` wraps it with the token-to-box conversion and
the packing of both LSTM layers' states into PuffeRL's single recurrent-state buffer. Every width is read
live from the modules, so a policy shrunk in place keeps working and is saved with its new widths.
"""

import math

import torch
from mettagrid.envs.mettagrid_puffer_env import MettaGridPufferEnv
from torch import nn

EMPTY_TOKEN = 0xFF
GLOBAL_TOKEN = 0xFE

DEFAULT_WIDTHS = {
    "cnn1": 64,
    "cnn2": 64,
    "fc1": 128,
    "encoded_obs": 128,
    "lstm1": 128,
    "lstm2": 128,
    "actor_1": 512,
    "critic_1": 1024,
    "action_embedding": 16,
}


def tokens_to_box(
    tokens: torch.Tensor,
    feature_scale: torch.Tensor,
    height: int,
    width: int,
    tag_feature: int,
    num_tags: int,
) -> torch.Tensor:
    """(N, M, 3) uint8 tokens -> (N, F + num_tags, height, width) float box, F = len(feature_scale).

    Byte 0 packs row << 4 | col (0xFF empty, 0xFE global), byte 1 is the feature id, byte 2 the value. Global
    tokens go to the centre cell (the agent's own cell). A value lands in its feature's channel, multiplied by
    the feature's scale, except for tag tokens: their value names the object's type, so they set channel
    F + value to 1 (one-hot) instead.
    """
    num_features = feature_scale.shape[0]
    num_channels = num_features + num_tags
    n = tokens.shape[0]
    coords = tokens[..., 0].long()
    features = tokens[..., 1].long()
    raw = tokens[..., 2]
    is_tag = features == tag_feature
    channels = torch.where(is_tag, num_features + raw.long(), features)
    values = torch.where(is_tag, 1.0, raw.float() * feature_scale[features.clamp(max=num_features - 1)])
    is_global = coords == GLOBAL_TOKEN
    rows = torch.where(is_global, height // 2, coords >> 4)
    cols = torch.where(is_global, width // 2, coords & 0x0F)
    valid = (coords != EMPTY_TOKEN) & (features < num_features) & (channels < num_channels)
    valid &= (rows < height) & (cols < width)
    cells = height * width
    # invalid tokens are sent to one spare slot past the end, dropped below
    index = torch.where(valid, channels * cells + rows * width + cols, num_channels * cells)
    box = torch.zeros(n, num_channels * cells + 1, dtype=values.dtype, device=tokens.device)
    box.scatter_reduce_(1, index, values, reduce="amax")
    return box[:, :-1].reshape(n, num_channels, height, width)


class FastCore(nn.Module):
    """Feature box -> cnn1 -> cnn2 -> fc1 -> encoded_obs -> lstm1 -> lstm2 -> actor / critic heads.

    `forward(box, h1, c1, h2, c2)`: box is (B*T, C, H, W), states are (B, H1) / (B, H2); returns
    logits (B*T, A), value (B*T, 1) and the new states (B, ...).
    """

    def __init__(self, num_features: int, obs_height: int, obs_width: int, num_actions: int, widths: dict[str, int]):
        super().__init__()
        self.cnn1 = nn.Conv2d(num_features, widths["cnn1"], kernel_size=5, stride=3)
        self.cnn2 = nn.Conv2d(widths["cnn1"], widths["cnn2"], kernel_size=3, stride=1)
        conv_height = ((obs_height - 5) // 3 + 1) - 2
        conv_width = ((obs_width - 5) // 3 + 1) - 2
        self.fc1 = nn.Linear(widths["cnn2"] * conv_height * conv_width, widths["fc1"])
        self.encoded_obs = nn.Linear(widths["fc1"], widths["encoded_obs"])
        self.lstm1 = nn.LSTM(widths["encoded_obs"], widths["lstm1"], batch_first=True)
        self.lstm2 = nn.LSTM(widths["lstm1"], widths["lstm2"], batch_first=True)
        self.critic_1 = nn.Linear(widths["lstm2"], widths["critic_1"])
        self.value = nn.Linear(widths["critic_1"], 1)
        self.actor_1 = nn.Linear(widths["lstm2"], widths["actor_1"])
        self.action_query_weight = nn.Parameter(torch.empty(widths["actor_1"], widths["action_embedding"]))
        self.action_embeddings = nn.Embedding(num_actions, widths["action_embedding"])
        self.action_bias = nn.Parameter(torch.zeros(num_actions))
        self.register_buffer("action_ids", torch.arange(num_actions))
        self._init_weights()

    def _init_weights(self) -> None:
        for layer in (self.cnn1, self.cnn2, self.fc1, self.encoded_obs, self.critic_1, self.actor_1):
            nn.init.orthogonal_(layer.weight, math.sqrt(2))
            nn.init.zeros_(layer.bias)
        nn.init.orthogonal_(self.value.weight, 1.0)
        nn.init.zeros_(self.value.bias)
        bound = 1 / math.sqrt(self.action_query_weight.shape[0])
        nn.init.uniform_(self.action_query_weight, -bound, bound)
        nn.init.normal_(self.action_embeddings.weight, std=0.1)

    def forward(
        self, box: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor, h2: torch.Tensor, c2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.relu(self.cnn1(box))
        x = torch.relu(self.cnn2(x))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.encoded_obs(x))
        x = x.reshape(h1.shape[0], -1, x.shape[-1])
        out1 = self.lstm1(x, (h1.unsqueeze(0), c1.unsqueeze(0)))
        out2 = self.lstm2(out1[0], (h2.unsqueeze(0), c2.unsqueeze(0)))
        x = out2[0]
        x = x.reshape(-1, x.shape[-1])
        value = self.value(torch.tanh(self.critic_1(x)))
        actor_hidden = torch.relu(self.actor_1(x))
        query = torch.tanh(actor_hidden @ self.action_query_weight)
        logits = query @ self.action_embeddings(self.action_ids).T + self.action_bias
        return (
            logits,
            value,
            out1[1][0].squeeze(0),
            out1[1][1].squeeze(0),
            out2[1][0].squeeze(0),
            out2[1][1].squeeze(0),
        )


class FastPolicy(nn.Module):
    """PuffeRL-facing: tokens in, (logits, value) out, recurrent state packed as [layer 1 | layer 2]."""

    def __init__(
        self,
        core: FastCore,
        obs_height: int,
        obs_width: int,
        feature_scale: torch.Tensor,
        tag_feature: int = -1,
    ):
        super().__init__()
        self.core = core
        self.obs_height = obs_height
        self.obs_width = obs_width
        self.register_buffer("feature_scale", feature_scale.float())
        # the feature whose values are object types, one-hot encoded after the feature channels (-1: none)
        self.tag_feature = tag_feature

    @property
    def hidden_size(self) -> int:
        return self.core.lstm1.hidden_size + self.core.lstm2.hidden_size

    @property
    def num_tags(self) -> int:
        return self.core.cnn1.in_channels - self.feature_scale.shape[0]

    def box(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_box(
            tokens, self.feature_scale, self.obs_height, self.obs_width, self.tag_feature, self.num_tags
        )

    def _run(
        self, box: torch.Tensor, packed_h: torch.Tensor | None, packed_c: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if packed_h is None:
            packed_h = box.new_zeros(batch, self.hidden_size)
            packed_c = box.new_zeros(batch, self.hidden_size)
        split = [self.core.lstm1.hidden_size, self.core.lstm2.hidden_size]
        h1, h2 = packed_h.split(split, dim=1)
        c1, c2 = packed_c.split(split, dim=1)
        logits, value, h1, c1, h2, c2 = self.core(box, h1, c1, h2, c2)
        return logits, value, torch.cat([h1, h2], dim=1), torch.cat([c1, c2], dim=1)

    def forward_eval(self, observations: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for (N, M, 3) tokens; reads and replaces state['lstm_h'|'lstm_c'], (N, hidden_size)."""
        logits, value, state["lstm_h"], state["lstm_c"] = self._run(
            self.box(observations), state.get("lstm_h"), state.get("lstm_c"), observations.shape[0]
        )
        return logits, value

    def forward(self, observations: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Training on (B, T, M, 3) token segments from zero (or given) state; value comes back as (B, T)."""
        batch, horizon = observations.shape[:2]
        box = self.box(observations.reshape(batch * horizon, *observations.shape[2:]))
        logits, value, state["lstm_h"], state["lstm_c"] = self._run(
            box, state.get("lstm_h"), state.get("lstm_c"), batch
        )
        return logits, value.reshape(batch, horizon)


def architecture(policy: FastPolicy) -> dict:
    """Every width of the policy, read from its current parameter shapes (a shrunk policy reports its own)."""
    core = policy.core
    return {
        "name": "fast",
        "num_features": policy.feature_scale.shape[0],
        "tag_feature": policy.tag_feature,
        "num_tags": policy.num_tags,
        "obs_height": policy.obs_height,
        "obs_width": policy.obs_width,
        "num_actions": core.action_embeddings.weight.shape[0],
        "widths": {
            "cnn1": core.cnn1.weight.shape[0],
            "cnn2": core.cnn2.weight.shape[0],
            "fc1": core.fc1.weight.shape[0],
            "encoded_obs": core.encoded_obs.weight.shape[0],
            "lstm1": core.lstm1.weight_hh_l0.shape[1],
            "lstm2": core.lstm2.weight_hh_l0.shape[1],
            "actor_1": core.actor_1.weight.shape[0],
            "critic_1": core.critic_1.weight.shape[0],
            "action_embedding": core.action_embeddings.weight.shape[1],
        },
    }


def build_policy(arch: dict) -> FastPolicy:
    """A freshly initialised policy with the widths of `arch` (as written by `architecture`)."""
    if arch["name"] != "fast":
        raise ValueError(f"unknown policy architecture {arch['name']!r}; available: fast")
    # specs written before object types were one-hot encoded have neither key
    channels = arch["num_features"] + arch.get("num_tags", 0)
    core = FastCore(channels, arch["obs_height"], arch["obs_width"], arch["num_actions"], arch["widths"])
    feature_scale = torch.ones(arch["num_features"])
    return FastPolicy(core, arch["obs_height"], arch["obs_width"], feature_scale, arch.get("tag_feature", -1))


def make_policy(env: MettaGridPufferEnv, name: str = "fast") -> FastPolicy:
    """The policy for `env` with the layout's default widths; sizes and feature scales come from the env."""
    cfg = env.env_cfg.game
    id_map = cfg.id_map()
    features = id_map.features()
    feature_scale = torch.zeros(max(f.id for f in features) + 1)
    for feature in features:
        feature_scale[feature.id] = 1.0 / feature.normalization
    arch = {
        "name": name,
        "num_features": feature_scale.shape[0],
        "tag_feature": id_map.feature_id("tag"),
        "num_tags": len(id_map.tag_names()),
        "obs_height": cfg.obs.height,
        "obs_width": cfg.obs.width,
        "num_actions": int(env.single_action_space.n),
        "widths": dict(DEFAULT_WIDTHS),
    }
    policy = build_policy(arch)
    policy.feature_scale.copy_(feature_scale)
    return policy
