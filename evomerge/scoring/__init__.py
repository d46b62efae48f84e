"""Turning a model into task metrics: item subsets and windows of lm-eval tasks, the lean greedy
decoder, confidence intervals of a weighted score.

May import: `evomerge.io` (which reads the task data). Never the search, workers or candidates."""
