"""Experiments: Hydra entry points that drive `functional_parallel` (the only package that imports Hydra)."""
