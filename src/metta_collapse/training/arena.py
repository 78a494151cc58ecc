"""The arena task (Metta's `arena_basic_easy_shaped`) built from mettagrid 0.26's object/handler config.

mettagrid's own `make_arena` has walls and agents only, so the converter chain is built here: moving into a
mine gives ore_red, a generator turns ore_red into battery_red, an altar turns one battery_red into a heart.
"""

import functools

import mettagrid.mapgen.scenes.random
import numpy as np
import pufferlib.vector
from mettagrid.config.handler_config import Handler, actorHas, updateActor
from mettagrid.config.mettagrid_config import (
    ActionsConfig,
    AgentConfig,
    ChangeVibeActionConfig,
    GameConfig,
    GridObjectConfig,
    InventoryConfig,
    MettaGridConfig,
    MoveActionConfig,
    NoopActionConfig,
    ObsConfig,
    ResourceLimitsConfig,
    WallConfig,
)
from mettagrid.config.reward_config import inventoryReward
from mettagrid.envs.mettagrid_puffer_env import MettaGridPufferEnv
from mettagrid.map_builder.ascii import AsciiMapBuilder
from mettagrid.map_builder.map_builder import MapBuilderConfig
from mettagrid.map_builder.random_map import RandomMapBuilder
from mettagrid.mapgen.mapgen import MapGen
from mettagrid.simulator import Simulator, SimulatorEventHandler

RESOURCES = ["ore_red", "battery_red", "heart", "laser", "armor", "blueprint"]
# (weight, cap) of the shaped inventory rewards
REWARDS = {
    "heart": (1.0, 100),
    "ore_red": (0.1, 1),
    "battery_red": (0.8, 1),
    "laser": (0.5, 1),
    "armor": (0.5, 1),
    "blueprint": (0.5, 1),
}
OBS_WIDTH = OBS_HEIGHT = 11
OBS_TOKENS = 200

SMALL_ARENA_AGENTS = 6
SMALL_ARENA_SIZE = 15
SMALL_ARENA_MAX_STEPS = 256
SMALL_ARENA_OBJECTS = {"mine_red": 4, "generator_red": 3, "altar": 3, "wall": 8}

# Characters for ASCII maps (tests, demos); '#' wall, '.' empty and '@' agent are mettagrid's defaults.
ASCII_LEGEND = {"m": "mine_red", "g": "generator_red", "a": "altar", "l": "lasery", "r": "armory"}


def converter(name: str, inputs: dict[str, int], outputs: dict[str, int]) -> GridObjectConfig:
    """An object that, when an agent moves into it, takes `inputs` from the agent and gives `outputs`."""
    return GridObjectConfig(
        name=name,
        on_use_handler=Handler(
            filters=[actorHas(inputs)] if inputs else [],
            mutations=[updateActor({**{k: -v for k, v in inputs.items()}, **outputs})],
        ),
    )


def arena_objects(combat_items: bool) -> dict[str, GridObjectConfig]:
    objects = {
        "wall": WallConfig(),
        "mine_red": converter("mine_red", {}, {"ore_red": 1}),
        "generator_red": converter("generator_red", {"ore_red": 1}, {"battery_red": 1}),
        # the "easy" altar: one battery per heart instead of three
        "altar": converter("altar", {"battery_red": 1}, {"heart": 1}),
    }
    if combat_items:
        objects["lasery"] = converter("lasery", {"ore_red": 1, "battery_red": 2}, {"laser": 1})
        objects["armory"] = converter("armory", {"ore_red": 3}, {"armor": 1})
    return objects


def make_game(
    num_agents: int, map_builder: MapBuilderConfig, max_steps: int, combat_items: bool, label: str
) -> MettaGridConfig:
    rewards = {item: inventoryReward(item, weight=weight, max=cap) for item, (weight, cap) in REWARDS.items()}
    inventory = InventoryConfig(default_limit=50, limits={"heart": ResourceLimitsConfig(base=255, resources=["heart"])})
    return MettaGridConfig(
        label=label,
        game=GameConfig(
            num_agents=num_agents,
            max_steps=max_steps,
            resource_names=list(RESOURCES),
            # objects here use handlers, not protocols: protocol tokens would only add empty feature channels
            protocol_details_obs=False,
            obs=ObsConfig(width=OBS_WIDTH, height=OBS_HEIGHT, num_tokens=OBS_TOKENS),
            actions=ActionsConfig(
                noop=NoopActionConfig(),
                move=MoveActionConfig(),
                change_vibe=ChangeVibeActionConfig(enabled=False),
            ),
            objects=arena_objects(combat_items),
            agent=AgentConfig(rewards=rewards, inventory=inventory),
            map_builder=map_builder,
        ),
    )


def make_arena(num_agents: int = 24) -> MettaGridConfig:
    """The full arena: 24 agents on mettagrid's 25x25 arena map with Metta's arena objects."""
    map_builder = MapGen.Config(
        num_agents=num_agents,
        width=25,
        height=25,
        border_width=6,
        instance_border_width=0,
        instance=mettagrid.mapgen.scenes.random.Random.Config(
            agents=num_agents,
            objects={"wall": 10, "mine_red": 10, "generator_red": 5, "altar": 5, "lasery": 1, "armory": 1},
        ),
    )
    return make_game(num_agents, map_builder, max_steps=1000, combat_items=True, label="arena.basic_easy_shaped")


def make_small_arena() -> MettaGridConfig:
    """The small arena used by tests, demos and CPU benchmarks: fixed once, used everywhere."""
    map_builder = RandomMapBuilder.Config(
        agents=SMALL_ARENA_AGENTS,
        width=SMALL_ARENA_SIZE,
        height=SMALL_ARENA_SIZE,
        border_width=1,
        objects=dict(SMALL_ARENA_OBJECTS),
    )
    return make_game(
        SMALL_ARENA_AGENTS,
        map_builder,
        max_steps=SMALL_ARENA_MAX_STEPS,
        combat_items=False,
        label="arena.small",
    )


def make_ascii_arena(map_data: list[str], max_steps: int = 100) -> MettaGridConfig:
    """An arena on a hand-drawn map (see ASCII_LEGEND), with objects at known cells."""
    num_agents = sum(row.count("@") for row in map_data)
    map_builder = AsciiMapBuilder.Config(map_data=map_data, char_to_map_name=ASCII_LEGEND)
    return make_game(num_agents, map_builder, max_steps=max_steps, combat_items=True, label="arena.ascii")


class EpisodeStats(SimulatorEventHandler):
    """Reports each finished episode's agent stats (mean over agents) and reward in the step infos."""

    def on_episode_end(self) -> None:
        stats = self._sim.episode_stats
        # resources never gained in an episode still count, as zero
        totals = {f"{resource}.gained": 0.0 for resource in RESOURCES}
        for agent_stats in stats["agent"]:
            for name, value in agent_stats.items():
                totals[name] = totals.get(name, 0.0) + value
        num_agents = len(stats["agent"])
        self._sim._context["infos"] = {
            "env_agent": {name: value / num_agents for name, value in totals.items()},
            "overview": {"reward": float(np.mean(self._sim.episode_rewards))},
        }


# Which maps each use of the arena plays. mettagrid plays episode k of an environment on map seed `base + k`, so
# every environment copy gets its own base from the use (stream), its vector env's seed and its copy index, in
# separate bit fields: two copies that differ in any of the three never share a map while each plays fewer than
# 2**EPISODE_BITS episodes. Held-out data (a collapse's parts, evaluations) can never meet a training map.
MAP_STREAMS = ("train", "fit", "select", "report", "evaluate")
SEED_BITS, COPY_BITS, EPISODE_BITS = 32, 16, 24


def map_seed(stream: str, seed: int, copy: int) -> int:
    """The map seed of the first episode of environment copy `copy` of a vector env made with `seed` for `stream`."""
    if not (0 <= seed < 2**SEED_BITS and 0 <= copy < 2**COPY_BITS):
        raise ValueError(f"map seeds take a seed below 2**{SEED_BITS} and a copy below 2**{COPY_BITS}")
    return ((MAP_STREAMS.index(stream) << SEED_BITS | seed) << COPY_BITS | copy) << EPISODE_BITS


def make_env(
    env_cfg: MettaGridConfig, buf: dict | None = None, seed: int = 0, maps: int | None = None
) -> MettaGridPufferEnv:
    """One environment; unseeded random maps are drawn from `maps` (default: copy 0 of training with `seed`)."""
    if getattr(env_cfg.game.map_builder, "seed", 0) is None:
        # unseeded random maps would come from OS entropy
        env_cfg = env_cfg.model_copy(deep=True)
        env_cfg.game.map_builder.seed = map_seed("train", seed, 0) if maps is None else maps
    simulator = Simulator()
    simulator.add_event_handler(EpisodeStats())
    return MettaGridPufferEnv(simulator, env_cfg, buf=buf, seed=seed)


def make_vecenv(
    env_cfg: MettaGridConfig, num_envs: int = 1, seed: int = 0, stream: str = "train"
) -> pufferlib.vector.Serial:
    """`num_envs` copies of the environment stepped one after another in this process, each on its own maps of
    `stream` drawn from `seed`."""
    # pufferlib.vector.make takes a `seed` but never hands it to the backend, so Serial numbers its copies 0, 1, ...
    # whatever the seed: each copy gets its own creator, with its maps bound here
    creators = [functools.partial(make_env, maps=map_seed(stream, seed, copy)) for copy in range(num_envs)]
    return pufferlib.vector.make(
        creators,
        env_args=[[]] * num_envs,
        env_kwargs=[{"env_cfg": env_cfg}] * num_envs,
        num_envs=num_envs,
        backend=pufferlib.vector.Serial,
    )
