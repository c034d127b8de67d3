"""Sweeps: the search space, one trial, and the Optuna plumbing (storage, sampler, pruner, report)."""
