"""The policy acting in its arena: token observations of every agent, for a collapse's data and its record."""

import torch
from mettagrid import MettaGridConfig

from metta_collapse.training.arena import make_vecenv
from metta_collapse.training.policy import FastPolicy


def rollouts(
    policy: FastPolicy, env_cfg: MettaGridConfig, copies: int, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` fresh copies of the arena (maps drawn from `seed`), `steps` steps from zero recurrent state,
    actions sampled. Returns the observations (agents, steps, tokens, 3) and each agent's copy index."""
    vecenv = make_vecenv(env_cfg, copies, seed)
    device = policy.feature_scale.device
    try:
        observations, _ = vecenv.reset(seed)
        state: dict = {}
        frames = []
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(steps):
                tokens = torch.as_tensor(observations)
                frames.append(tokens)
                logits, _ = policy.forward_eval(tokens.to(device), state)
                actions = torch.multinomial(torch.softmax(logits.cpu(), -1), 1, generator=generator).squeeze(1)
                observations, *_ = vecenv.step(actions.numpy())
    finally:
        vecenv.close()
    agents = frames[0].shape[0]
    return torch.stack(frames, dim=1), torch.arange(agents) // (agents // copies)
