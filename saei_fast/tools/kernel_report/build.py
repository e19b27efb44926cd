"""Compile every plan of the chosen kernel modules for one target and write the report.

Plans are described and compiled in a small pool of fresh processes (``spawn``: the caller
may have imported the kernels under the interpreter). Plans whose compiled variant is the
same (kernel, types, constants, alignment, options) are compiled once and reported once per
shape. Triton's on-disk cache makes a second run fast.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from saei_fast.kernels.plan import TARGETS
from saei_fast.tools.kernel_report import compile as compile_
from saei_fast.tools.kernel_report.report import markdown, record, write_json


@contextlib.contextmanager
def _environment(changes: dict[str, str | None]) -> Iterator[None]:
    # Spawned workers copy os.environ when they start, so the change must hold until the
    # pool shuts down; it is undone afterwards for the calling process.
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_report(
    arch: str,
    out_dir: str | Path,
    ops: tuple[str, ...] = tuple(compile_.OP_MODULES),
    *,
    jobs: int = 2,
    progress: Callable[[str], None] = print,
    modules: dict[str, str] | None = None,
) -> tuple[list[dict], list[str]]:
    """Compile the benchmark plans of ``ops`` for ``arch``; write ``report.json``,
    ``report.md`` and the binaries under ``out_dir``. Returns ``(records, problems)``:
    ``problems`` names modules without plans and plans that failed to compile.

    ``modules`` maps op names to the modules holding their ``benchmark_plans`` (default
    :data:`~saei_fast.tools.kernel_report.compile.OP_MODULES`; tests point it at toy kernels).
    """
    modules = compile_.OP_MODULES if modules is None else modules
    if arch not in TARGETS:
        raise ValueError(f"arch must be one of {sorted(TARGETS)}, got {arch!r}")
    unknown = [op for op in ops if op not in modules]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(modules)}, got {ops}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    target = TARGETS[arch]
    out = Path(out_dir)
    binaries = out / "kernels"
    binaries.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    plans: list[dict] = []
    compiled: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with (
        _environment(compile_.worker_environment()),
        ProcessPoolExecutor(jobs, mp_context=context) as pool,
    ):
        described = {op: pool.submit(compile_.describe, modules[op], arch) for op in ops}
        for op, future in described.items():
            try:
                plans += future.result()
            except Exception as error:  # a module without plans is reported, not fatal
                problems.append(f"{op}: {type(error).__name__}: {error}")
        first_of: dict[str, dict] = {}
        for plan in plans:
            first_of.setdefault(plan["key"], plan)
        futures: dict[Future, dict] = {
            pool.submit(
                compile_.compile_plan, plan["module"], plan["index"], arch, str(binaries)
            ): plan
            for plan in first_of.values()
        }
        for done, future in enumerate(as_completed(futures), 1):
            plan = futures[future]
            name = f"{plan['op']} {plan['kernel']} {plan['dtype']} {plan['config']}"
            try:
                compiled[plan["key"]] = result = future.result()
            except Exception as error:
                problems.append(f"{name}: compile failed: {type(error).__name__}: {error}")
                progress(f"[{done}/{len(futures)}] {arch} {name}: FAILED ({error})")
                continue
            progress(
                f"[{done}/{len(futures)}] {arch} {name}: {result['registers']} regs, "
                f"{result['spill_bytes']} B spilled, {result['load_bits']}-bit loads, "
                f"mma={result['mma']} ({result['compile_s']:.1f} s)"
            )
    files = {"cubin", "sass", "ptx", "hsaco", "amdgcn"}
    records = []
    for plan in plans:
        if plan["key"] in compiled:
            row = record(target, plan, compiled[plan["key"]])
            records.append(row | {k: f"kernels/{v}" for k, v in row.items() if k in files})
    write_json(records, out / "report.json")
    (out / "problems.json").write_text(json.dumps(problems, indent=1) + "\n")
    (out / "report.md").write_text(markdown(records, target, problems))
    return records, problems
