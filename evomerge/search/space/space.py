"""A search space bound to its models: genes, bounds, x0, and `decode(genome) -> Recipe`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import EvomergeError, shown
from evomerge.merge.jobs import ModelCatalog, ModelInfo
from evomerge.merge.plan import plan_merge
from evomerge.merge.recipe import ModelTokenSource, Recipe, TokenizerConfig
from evomerge.search.space.config import SpaceConfig, load_space_config
from evomerge.search.space.dfs import DFSLayout
from evomerge.search.space.genes import Gene, check_genome
from evomerge.search.space.ps import PSLayout


class SearchSpace:
    """One optimisation problem: a PS space or a DFS space (PS+DFS runs as two of them in sequence).

    Binding reads each model's config.json and safetensors headers (never weights), resolves model
    paths against `root` (the space file's folder) to absolute paths, and decodes x0 once through
    the merge planner, so a space that cannot produce a valid recipe fails before any evaluation.
    """

    def __init__(self, config: SpaceConfig, root: Path | str = ".", *, check: bool = True):
        if config.ps is not None and config.dfs is not None:
            raise EvomergeError("ps/dfs: a PS+DFS space runs as two stages; bind each with stage_config()")
        self.root = Path(root).resolve()
        self.catalog = ModelCatalog([self.root])
        self.config = self._resolved(config)
        self.layout: PSLayout | DFSLayout
        if self.config.ps is not None:
            sources = [self._info(m, f"models[{i}]") for i, m in enumerate(self.config.models)]
            base = self._info(self.config.base_model, "base_model") if self.config.base_model else None
            if base is not None and any(s.path == base.path for s in sources):
                raise EvomergeError("models: list the fine-tuned models only; the base model is base_model")
            self.layout = PSLayout(self.config.ps, sources, base)
        else:
            dfs = self.config.dfs
            assert dfs is not None
            refs = dfs.models or self.config.models
            sources = [self._info(m, f"dfs.models[{i}]") for i, m in enumerate(refs)]
            anchor = refs.index(dfs.anchor) if dfs.anchor is not None else 0
            self.layout = DFSLayout(dfs, sources, anchor, self.config.budget.sigma0)
        self.genes: list[Gene] = self.layout.genes
        if self.config.budget.popsize is None:
            budget = self.config.budget.model_copy(update={"popsize": default_popsize(len(self.genes))})
            self.config = self.config.model_copy(update={"budget": budget})
        if check:
            plan_merge(self.decode(self.x0, seed=0), self.catalog)

    # -- binding -----------------------------------------------------------------------------------

    def _info(self, reference: str, where: str) -> ModelInfo:
        return self.catalog.resolve(reference, where)

    def _absolute(self, reference: str, where: str) -> str:
        return str(self.catalog.resolve(reference, where).path)

    def _resolved(self, config: SpaceConfig) -> SpaceConfig:
        """The same space with absolute model and task paths (what a run directory records)."""
        update: dict = {"models": [self._absolute(m, f"models[{i}]") for i, m in enumerate(config.models)]}
        if config.base_model:
            update["base_model"] = self._absolute(config.base_model, "base_model")
        if config.tokenizer is not None:
            update["tokenizer"] = self._resolved_tokenizer(config.tokenizer)
        update["include_paths"] = [self._folder(p, f"include_paths[{i}]") for i, p in enumerate(config.include_paths)]
        if config.dfs is not None:
            refs = config.dfs.models or config.models
            absolute = [self._absolute(m, f"dfs.models[{i}]") for i, m in enumerate(refs)]
            anchor = None
            if config.dfs.anchor is not None:
                if config.dfs.anchor not in refs:
                    raise EvomergeError(
                        f"dfs.anchor: {config.dfs.anchor!r} is not one of the DFS models ({', '.join(refs)})"
                    )
                anchor = absolute[refs.index(config.dfs.anchor)]
            update["dfs"] = config.dfs.model_copy(update={"models": absolute, "anchor": anchor})
        return config.model_copy(update=update)

    def _folder(self, path: str, where: str) -> str:
        """A folder of task YAMLs as an absolute path."""
        try:
            folder = (self.root / path).resolve()
            found = folder.is_dir()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            folder, found = self.root / path, False
        if not found:
            raise EvomergeError(f"{where}: {shown(str(folder))} is not a folder of task YAMLs")
        return str(folder)

    def _resolved_tokenizer(self, tokenizer: TokenizerConfig) -> TokenizerConfig:
        """The tokenizer: block with absolute model paths (recipes are merged from anywhere)."""
        update: dict = {}
        if tokenizer.source not in ("union", "base"):
            update["source"] = self._absolute(tokenizer.source, "tokenizer.source")
        tokens = {}
        for token, setting in (tokenizer.tokens or {}).items():
            source, where = setting.source, f"tokenizer.tokens.{token}.source"
            if isinstance(source, str):
                source = self._absolute(source, where)
            elif isinstance(source, ModelTokenSource):
                source = source.model_copy(update={"model": self._absolute(source.model, f"{where}.model")})
            tokens[token] = setting.model_copy(update={"source": source})
        if tokenizer.tokens:
            update["tokens"] = tokens
        return tokenizer.model_copy(update=update)

    # -- the problem ---------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    @property
    def x0(self) -> list[float]:
        return [g.x0 for g in self.genes]

    @property
    def lower(self) -> list[float]:
        return [g.low for g in self.genes]

    @property
    def upper(self) -> list[float]:
        return [g.high for g in self.genes]

    @property
    def stds(self) -> list[float]:
        """Per-gene step sizes: sigma0 is a fraction of each gene's range."""
        return [g.span for g in self.genes]

    @property
    def popsize(self) -> int:
        assert self.config.budget.popsize is not None
        return self.config.budget.popsize

    def decode(self, genome: Sequence[float], seed: int | None = None) -> Recipe:
        """The recipe a genome stands for; `seed` is the DARE/DELLA mask seed (random methods only)."""
        values = check_genome(genome, self.genes)
        recipe = self.layout.decode(values, seed) if isinstance(self.layout, PSLayout) else self.layout.decode(values)
        if self.config.tokenizer is not None:
            recipe = recipe.model_copy(update={"tokenizer": self.config.tokenizer})
        return recipe

    @property
    def source_models(self) -> list[str]:
        """Every model a decoded recipe may reference (what workers load), base first."""
        refs = [self.config.base_model] if self.config.base_model and self.config.ps else []
        refs += [s.reference for s in self.layout.sources]
        return list(dict.fromkeys(refs))

    @property
    def compared_models(self) -> list[str]:
        """The models the final recipe is reported against: the sources being merged."""
        return [s.reference for s in self.layout.sources]


def default_popsize(n_genes: int) -> int:
    """4 + floor(3 ln n), the paper's (and pycma's) population size."""
    return 4 + int(math.floor(3 * math.log(max(n_genes, 1))))


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    return SearchSpace(load_space_config(path), root=path.resolve().parent)
