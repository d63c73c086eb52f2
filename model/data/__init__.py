"""What is read from and written to disk: training sources, datasets, preference pairs, model folders and checkpoints."""
