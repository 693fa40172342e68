"""The frameworks tools/compare_frameworks.py trains side by side, one module each.

``common`` holds what every framework's run shares (the shape, result records, running a
logged process), ``venv`` the peers' Python 3.12 environments and ``report`` the summary
table and BENCHMARKS.md section; ``jaxformer_run``, ``maxtext`` and ``levanter`` each hold
only that framework's config translation and output parsing.
"""
