"""Internals of :mod:`batched_fn.torch`, one job per module.

Nothing here imports torch at import time of this package: ``model`` imports
the other modules (which do import torch) only when a model is built.
"""
