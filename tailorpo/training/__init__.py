"""A training run: building its parts, the loop, evaluation, checkpoints and the run log."""
