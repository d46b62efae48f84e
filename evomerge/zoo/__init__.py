"""The embedded toy model zoo and its synthetic lm-eval tasks (shipped in the repository's zoo/).

May import: `evomerge.io`. Used by the CLI, tests and benchmarks only."""
