"""Training: the LightningModule, the Trainer and its callbacks, run directories,
checkpoints, stops, progress, and the command-line runner every command shares.

Nothing is imported here: `vitexp.training.cli` (one-line errors) stays free of Lightning.
"""
