"""Evaluation: FID statistics and the metric models of each protocol."""
