"""``python -m batched_fn.examples.server``: see the package's docstring and ``--help``."""

from .app import main

main()
