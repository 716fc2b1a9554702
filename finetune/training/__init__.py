"""Turning a model and data into trained weights: the loop over phases, optimizer and schedule, loss, checkpoints, caches, DDP."""
