"""The `evomerge` console commands (typer): parse options, call one function of a part, print.

May import every part, but lazily inside the commands: `import evomerge.cli.app` must stay free of
torch, transformers, ray and lm-eval so that `evomerge --help` answers at once."""
