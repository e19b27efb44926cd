"""Benchmark cases shared by ``pytest bench/`` and ``saei-fast bench``.

Per op, the providers (ours, PyTorch baselines, installed peers), the shapes for each
device, the input builders and the bytes / FLOPs formulas; the pytest suites and the
command both read them, so they time exactly the same calls.

Files: ``cases.py`` (the case types: ``Provider``, ``OpBench``, ``Case``), one
``<op>_cases.py`` per op (its ``OpBench``), ``registry.py`` (``OPS`` and ``cases_for``),
``timing.py`` / ``peaks.py`` (timing, memory and the device's peak rates), ``runner.py``
(cases to result rows), ``report.py`` (tables, CSV, JSON) and ``command.py``
(``saei-fast bench``).
"""

from saei_fast.tools.benchmarks.cases import Case, OpBench, Provider, skip_reason
from saei_fast.tools.benchmarks.registry import OPS, cases_for

__all__ = ["OPS", "Case", "OpBench", "Provider", "cases_for", "skip_reason"]
