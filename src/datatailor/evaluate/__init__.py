"""Evaluation: pairwise judging, win-rate metrics, data quality, diversity, contamination, privacy."""
