"""Benchmarks (`raysegment bench ...`): each measures one stage against a baseline in one run.

Kept out of the library packages (as Ray keeps its own under `release/`): nothing in
prepare, train or infer imports from here.
"""
