"""Scoring: the input list, the model on uint8 batches, rows, runs and the incremental index."""
