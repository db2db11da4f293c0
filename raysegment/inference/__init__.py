"""Batch inference on Ray Data."""
