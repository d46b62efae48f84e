"""What a run is, so that a resume continues the same problem: the search space's identity and a
fingerprint of every source model, recorded in run.json when the run starts and checked on every
resume."""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.io.fingerprint import sampled_fingerprint
from evomerge.search.payload import sha256
from evomerge.search.run import RUN_FILE, RUN_FORMAT, RunDir
from evomerge.search.space import SearchSpace


def source_fingerprints(space: SearchSpace) -> dict[str, str]:
    """Every model the search reads, by resolved path: what resume checks the models against."""
    paths = {space.catalog.resolve(ref, "models").path for ref in space.source_models}
    return {str(path): sampled_fingerprint(path) for path in sorted(paths)}


def space_sha(space: SearchSpace) -> str:
    """Identity of the problem: everything but the budget, which `resume --max-evals` may raise."""
    data = space.config.model_dump(mode="json")
    data["budget"].pop("max_evals", None)
    for key in ("tokenizer", "prompts"):  # spaces written before these options keep their identity
        if data.get(key) is None:
            data.pop(key, None)
    return sha256(data)


def check_run_identity(run: RunDir, space: SearchSpace) -> None:
    """run.json names the space and sources the journal was made with; replaying it under others is refused."""
    sha = space_sha(space)
    sources = source_fingerprints(space)
    state = run.read_json(RUN_FILE)
    if state is None:  # a new run (or one from before run.json: the replay check still guards it)
        run.write_json(RUN_FILE, {"format": RUN_FORMAT, "space_sha": sha, "sources": sources})
        return
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise EvomergeError(f"{run.file(RUN_FILE)}: not a run file of format {RUN_FORMAT}")
    if state.get("space_sha") != sha:
        raise EvomergeError(
            f"{run.space_file}: the search space changed since the run started; "
            "only budget.max_evals may change on resume"
        )
    recorded = state.get("sources")
    if recorded is None:  # a run from before sources were recorded: record them now
        run.write_json(RUN_FILE, {**state, "sources": sources})
        return
    changed = [model for model, print_ in recorded.items() if sources.get(model) != print_]
    if changed:
        raise EvomergeError(
            f"{changed[0]}: this source model changed since the run started (its weights or config differ "
            f"from what {RUN_FILE} recorded); resume with the original models, or start a new run"
        )
