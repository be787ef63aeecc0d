"""Training runs: `train` (the `tfface train` command), resume, checkpoints."""
