"""Data-aware merges: calibration data, statistics pre-passes (Gram, Fisher), Git Re-Basin
permutations and REPAIR folds. The per-tensor method functions live in evomerge.merge.methods
(covariance.py, alignment.py); this package computes what they need before the first tensor."""
