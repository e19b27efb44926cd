"""Tools built on the library (demo, benchmark registry, kernel report, tiny test models):
they import the library and are never imported by it.

- ``demo/``: ``saei-fast demo``, GRPO with and without SaEI on a toy task.
- ``benchmarks/``: the benchmark registry ``saei-fast bench`` and ``pytest bench/`` time.
- ``kernel_report/``: ``saei-fast kernels``, the compiled kernels' report for a GPU target.
- ``testing.py``: tiny random-weight VLMs, their processors and batches.
"""
