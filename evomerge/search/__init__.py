"""The search: search spaces (`space/`, genomes -> recipes), optimizers (`optimizers/`), the driver
loop, objectives, staged fidelity, the payload workers receive, the run directory, and PS+DFS runs
(`entry` is the one entry point the CLI calls).

May import: `evomerge.workers`, `evomerge.scoring`, `evomerge.candidates`, `evomerge.merge`,
`evomerge.io`. Never the CLI, the report or the zoo."""
