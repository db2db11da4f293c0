"""Segmentation models, losses and metrics."""
