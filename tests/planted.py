"""Networks with planted fibration symmetry: a random base network whose units are copied, with the input
columns of each copied unit split at random (differently in every row) so that the sums still balance."""

import numpy as np
import torch


def sizes(base: int, generator: np.random.Generator, largest: int = 4) -> np.ndarray:
    return generator.integers(1, largest + 1, size=base)


def owners(fiber_sizes: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Base unit of every expanded unit, in a shuffled order (fibers are not contiguous)."""
    return generator.permutation(np.repeat(np.arange(len(fiber_sizes)), fiber_sizes))


def expand(
    weight: torch.Tensor,
    out_owner: np.ndarray | None,
    in_owner: np.ndarray | None,
    generator: np.random.Generator,
    equal: bool = False,
) -> torch.Tensor:
    """Rows copied by `out_owner`; along dim 1 each base column spread over its copies with random fractions
    (different in every row), or `equal` ones: only then do gradients keep the symmetry during training."""
    w = weight.detach().double().numpy()
    if out_owner is not None:
        w = w[out_owner]
    if in_owner is not None:
        columns = w[:, in_owner]
        fractions = np.ones(columns.shape) if equal else generator.uniform(0.2, 1.0, size=columns.shape)
        totals = np.zeros((w.shape[0], w.shape[1], *w.shape[2:]))
        np.add.at(totals, (slice(None), in_owner), fractions)
        w = columns * fractions / totals[:, in_owner]
    return torch.tensor(w, dtype=weight.dtype)


def expand_rows(vector: torch.Tensor, owner: np.ndarray) -> torch.Tensor:
    return vector.detach()[torch.as_tensor(owner)].clone()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def gate_owner(owner: np.ndarray, base: int, gates: int = 4) -> np.ndarray:
    return np.concatenate([owner + gate * base for gate in range(gates)])


def one_hot(labels, k: int | None = None) -> torch.Tensor:
    """S: the n x k 0/1 membership matrix of a partition."""
    labels = torch.as_tensor(np.asarray(labels))
    return torch.nn.functional.one_hot(labels, k or int(labels.max()) + 1).double()


def same_partition(a, b) -> bool:
    """Equal up to relabelling."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def expand_fast(policy, copies: int, seed: int = 0):
    """A `fast` policy whose every hidden unit is `copies` copies of the base core's (equal column splits,
    so training keeps the symmetry); heads' outputs and the action embeddings keep their size."""
    from metta_collapse.training.policy import FastCore, FastPolicy

    base = policy.core
    g = np.random.default_rng(seed)
    widths = {
        name: module.weight.shape[0]
        for name, module in [
            ("cnn1", base.cnn1),
            ("cnn2", base.cnn2),
            ("fc1", base.fc1),
            ("encoded_obs", base.encoded_obs),
            ("actor_1", base.actor_1),
            ("critic_1", base.critic_1),
        ]
    }
    widths |= {
        "lstm1": base.lstm1.hidden_size,
        "lstm2": base.lstm2.hidden_size,
        "action_embedding": base.action_embeddings.weight.shape[1],
    }
    owner = {name: g.permutation(np.repeat(np.arange(n), copies)) for name, n in widths.items()}
    big_widths = {name: len(o) for name, o in owner.items()} | {"action_embedding": widths["action_embedding"]}
    height, width = policy.obs_height, policy.obs_width
    big = FastCore(base.cnn1.in_channels, height, width, base.action_embeddings.num_embeddings, big_widths)
    positions = base.fc1.in_features // widths["cnn2"]
    flat = (owner["cnn2"][:, None] * positions + np.arange(positions)).ravel()
    with torch.no_grad():
        for name, inputs in [
            ("cnn1", None),
            ("cnn2", "cnn1"),
            ("fc1", flat),
            ("encoded_obs", "fc1"),
            ("actor_1", "lstm2"),
            ("critic_1", "lstm2"),
        ]:
            in_owner = owner[inputs] if isinstance(inputs, str) else inputs
            getattr(big, name).weight.copy_(expand(getattr(base, name).weight, owner[name], in_owner, g, True))
            getattr(big, name).bias.copy_(expand_rows(getattr(base, name).bias, owner[name]))
        for name, inputs in [("lstm1", "encoded_obs"), ("lstm2", "lstm1")]:
            b, w, rows = getattr(base, name), getattr(big, name), gate_owner(owner[name], widths[name])
            w.weight_ih_l0.copy_(expand(b.weight_ih_l0, rows, owner[inputs], g, True))
            w.weight_hh_l0.copy_(expand(b.weight_hh_l0, rows, owner[name], g, True))
            w.bias_ih_l0.copy_(expand_rows(b.bias_ih_l0, rows))
            w.bias_hh_l0.copy_(expand_rows(b.bias_hh_l0, rows))
        big.value.weight.copy_(expand(base.value.weight, None, owner["critic_1"], g, True))
        big.value.bias.copy_(base.value.bias)
        big.action_query_weight.copy_(expand(base.action_query_weight.T, None, owner["actor_1"], g, True).T)
        big.action_embeddings.weight.copy_(base.action_embeddings.weight)
        big.action_bias.copy_(base.action_bias)
    return FastPolicy(big, height, width, policy.feature_scale.clone(), policy.tag_feature)
