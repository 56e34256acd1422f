"""Rollout engines: generation for `align generate`, RL and evaluation."""
