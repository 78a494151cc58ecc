"""The policy acting in its arena: token observations of every agent, for a collapse's data and its record, and
what the agents achieved."""

import torch
from mettagrid import MettaGridConfig

from metta_collapse.training.arena import make_vecenv
from metta_collapse.training.policy import FastPolicy


def rollouts(
    policy: FastPolicy, env_cfg: MettaGridConfig, copies: int, steps: int, seed: int, stream: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`copies` fresh copies of the arena on maps of `stream` (`arena.MAP_STREAMS`: never a training map unless
    "train") drawn from `seed`, `steps` steps from zero recurrent state, actions sampled (from `seed` too: two
    policies run with one seed meet the same maps and draw the same random numbers). Returns the observations
    (agents, steps, tokens, 3), each agent's copy index, and each agent's hearts gained and reward in the episode
    under way at the last step (the whole run when `steps` is at most the episode's length)."""
    vecenv = make_vecenv(env_cfg, copies, seed, stream)
    device = policy.feature_scale.device
    try:
        observations, _ = vecenv.reset(seed)
        state: dict = {}
        frames = []
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(steps):
                tokens = torch.tensor(observations)  # a copy: the vector env overwrites its buffer each step
                frames.append(tokens)
                logits, _ = policy.forward_eval(tokens.to(device), state)
                actions = torch.multinomial(torch.softmax(logits.cpu(), -1), 1, generator=generator).squeeze(1)
                observations, *_ = vecenv.step(actions.numpy())
        # an episode's simulation is replaced at the step after its last, so a finished one is still here
        simulations = [env.current_simulation for env in vecenv.envs]
        outcome = {
            "hearts": torch.tensor(
                [agent.get("heart.gained", 0.0) for sim in simulations for agent in sim.episode_stats["agent"]]
            ),
            "reward": torch.cat([torch.as_tensor(sim.episode_rewards, dtype=torch.float64) for sim in simulations]),
        }
    finally:
        vecenv.close()
    agents = frames[0].shape[0]
    return torch.stack(frames, dim=1), torch.arange(agents) // (agents // copies), outcome
