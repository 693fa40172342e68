"""The ``jaxformer`` command line: argument parsing and printing only, over the library.

``main`` is the ``jaxformer`` entry point (``jaxformer.cli.main``); its ``sweep`` and
``checkpoints`` commands live in ``jaxformer.cli.sweep`` and ``jaxformer.cli.checkpoints``.
Nothing outside this package imports it: what a command does lives in the library.
"""

from jaxformer.cli.main import main

__all__ = ["main"]
