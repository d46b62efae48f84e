"""Search spaces: PS genes, DFS paths, decoding a genome into an ordinary merge recipe."""

from evomerge.search.space.config import SpaceConfig, dump_space_config, load_space_config, parse_space
from evomerge.search.space.dfs import Step, path_from_recipe, path_to_recipe
from evomerge.search.space.genes import Gene
from evomerge.search.space.space import SearchSpace, default_popsize, load_space

__all__ = [
    "Gene",
    "SearchSpace",
    "SpaceConfig",
    "Step",
    "default_popsize",
    "dump_space_config",
    "load_space",
    "load_space_config",
    "parse_space",
    "path_from_recipe",
    "path_to_recipe",
]
