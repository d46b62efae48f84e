"""Candidate evaluation: lm-eval tasks, fitness, materialization, executors."""
