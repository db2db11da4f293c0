"""Data sets: layouts, sharding, imaging, pipelines."""
