import numpy as np
import pytest
import torch

from metta_collapse.training.arena import (
    OBS_HEIGHT,
    OBS_TOKENS,
    OBS_WIDTH,
    REWARDS,
    make_arena,
    make_ascii_arena,
    make_env,
    make_small_arena,
)
from metta_collapse.training.rollout import rollouts

# the agent has a mine to its west, a generator to its east and an altar to its south
MAP = [
    "#####",
    "#m@g#",
    "#.a.#",
    "#####",
]


def test_converter_chain_changes_inventory_and_pays_shaped_rewards():
    env = make_env(make_ascii_arena(MAP))
    env.reset()
    sim = env.current_simulation
    agent = sim.agent(0)

    def step(action: str) -> float:
        _, rewards, *_ = env.step(np.array([sim.action_names.index(action)], dtype=np.int32))
        return float(rewards[0])

    # nothing to convert yet: the altar and the generator refuse
    assert step("move_south") == 0.0 and not agent.last_action_success
    assert step("move_east") == 0.0 and not agent.last_action_success
    assert agent.inventory == {}

    assert step("move_west") == pytest.approx(0.1)  # ore 1
    assert step("move_west") == pytest.approx(0.1)  # ore 2
    assert agent.inventory == {"ore_red": 2}
    # ore -> battery: +0.8 for the battery, -0.1 for the ore spent
    assert step("move_east") == pytest.approx(0.7)
    assert agent.inventory == {"ore_red": 1, "battery_red": 1}
    # the battery reward is capped at 1: a second battery adds only 0.2
    assert step("move_east") == pytest.approx(0.1)
    assert agent.inventory == {"battery_red": 2}
    # one battery -> one heart (the easy altar): +1 for the heart, -0.2 as the batteries drop below the cap
    assert step("move_south") == pytest.approx(0.8)
    assert agent.inventory == {"battery_red": 1, "heart": 1}
    assert step("move_south") == pytest.approx(0.2)
    assert agent.inventory == {"heart": 2}
    assert step("move_south") == 0.0 and not agent.last_action_success
    # using an object never moves the agent
    agent_object = next(obj for obj in sim.grid_objects().values() if obj.get("agent_id") == 0)
    assert (agent_object["r"], agent_object["c"]) == (1, 2)


def test_small_arena_is_fixed_and_shares_the_task():
    cfg = make_small_arena()
    game = cfg.game
    assert 4 <= game.num_agents <= 6
    assert (game.map_builder.width, game.map_builder.height) == (15, 15)
    assert {"mine_red", "generator_red", "altar"} <= set(game.map_builder.objects)
    assert game.max_steps > 0
    assert (game.obs.width, game.obs.height, game.obs.num_tokens) == (OBS_WIDTH, OBS_HEIGHT, OBS_TOKENS)
    full = make_arena().game
    assert full.num_agents == 24
    assert (full.obs.width, full.obs.height, full.obs.num_tokens) == (11, 11, 200)
    assert game.agent.rewards.keys() == full.agent.rewards.keys() == REWARDS.keys()
    for name, (weight, cap) in REWARDS.items():
        assert game.agent.rewards[name].weight == full.agent.rewards[name].weight == weight
        assert game.agent.rewards[name].max == full.agent.rewards[name].max == cap

    env = make_env(cfg)
    obs, _ = env.reset()
    assert obs.shape == (game.num_agents, 200, 3)
    assert env.single_action_space.n == 5


class Script:
    """A stand-in policy that takes the given actions, one per step, whatever it observes."""

    def __init__(self, actions: list[int], num_actions: int):
        self.feature_scale = torch.ones(1)
        self.seen: list[torch.Tensor] = []
        self.logits = torch.full((len(actions), num_actions), -torch.inf)
        self.logits[torch.arange(len(actions)), actions] = 0.0
        self.step = 0

    def forward_eval(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.step += 1
        self.seen.append(tokens.clone())
        return self.logits[self.step - 1 : self.step], torch.zeros(1)


@pytest.mark.parametrize(("steps", "hearts", "reward"), [(4, 0.0, 1.0), (6, 2.0, 2.0)])
def test_rollouts_count_the_hearts_and_reward_of_the_episode_to_its_last_step(steps: int, hearts: float, reward: float):
    cfg = make_ascii_arena(MAP, max_steps=6)
    names = make_env(cfg).current_simulation.action_names
    script = ["move_west", "move_west", "move_east", "move_east", "move_south", "move_south"]
    policy = Script([names.index(name) for name in script], len(names))
    observations, copies, outcome = rollouts(policy, cfg, copies=1, steps=steps, seed=0, stream="evaluate")
    assert copies.tolist() == [0] and torch.equal(observations, torch.stack(policy.seen, dim=1))
    # each step's move changes the agent's inventory or place, so what it sees
    assert len({frame.numpy().tobytes() for frame in observations[0]}) == steps
    # steps=6 ends the episode: its simulation is read before the next step would replace it
    assert outcome["hearts"].tolist() == [hearts] and outcome["reward"].tolist() == pytest.approx([reward])
