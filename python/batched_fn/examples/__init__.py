"""Runnable examples shipped with batched_fn."""
