"""raysegment: distributed image segmentation jobs (prepare, train, evaluate, infer) on Ray."""

__version__ = "0.1.0"
