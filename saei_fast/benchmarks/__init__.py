"""Benchmark cases shared by ``pytest bench/`` and ``saei-fast bench``.

The registry (``cases.py``) holds, per op, the providers (ours, PyTorch baselines, installed
peers), the shapes for each device, the input builders and the bytes / FLOPs formulas; the
pytest suites and the command both read it, so they time exactly the same calls.
"""

from saei_fast.benchmarks.cases import OPS, Case, OpBench, Provider, cases_for, skip_reason

__all__ = ["OPS", "Case", "OpBench", "Provider", "cases_for", "skip_reason"]
