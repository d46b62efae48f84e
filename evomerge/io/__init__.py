"""Model directories and files, the lowest part: lazy safetensors reads, atomic sharded writes,
architectures as data, loading a model for scoring, safe YAML, lm-eval task data, umask-respecting
writes and where the bundled resources live.

May import: nothing of evomerge but `evomerge.errors`. Everything else may import it."""
