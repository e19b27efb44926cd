"""The TMA forward (``kernels/linear_entropy/tma.py``) as ``saei-fast kernels --arch sm_90``
compiles it: operands through TMA, wgmma, no spills, the GPU kept busy.

One ``saei-fast kernels --arch sm_90 --ops linear`` run per session, in a subprocess without
``TRITON_INTERPRET`` (as ``test_kernel_report.py`` runs it), so the TMA plans are checked
exactly as the command lists them, beside the default forward they stand in for. Triton's
on-disk cache serves the binaries ``test_kernel_report.py`` already built, so the two TMA
variants are the only new compiles: the fixture took about 50 s on 2 busy cores with a warm
cache and about 2 minutes cold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from saei_fast.tools.kernel_report import nvidia
from saei_fast.tools.kernel_report.loops import innermost

LINEAR_NS = (2048, 4096, 8192, 12288, 16384)
TMA_ROLES = ("forward-tma", "frozen-head-tma")


def _nvidia_backend() -> bool:
    try:
        __import__("triton.backends.nvidia.compiler")
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def linear_report(tmp_path_factory) -> list[dict]:
    if not _nvidia_backend():
        pytest.skip("Triton without its CUDA backend")
    out = tmp_path_factory.mktemp("report-sm_90-linear")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "saei_fast.cli", "kernels", "--arch", "sm_90"]
    result = subprocess.run(
        [*command, "--ops", "linear", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads((out / "report.json").read_text())
    for r in records:  # assembly as absolute paths, for the tests to read
        r.update({k: str(out / r[k]) for k in ("cubin", "sass", "ptx") if k in r})
    return records


def _tma(records: list[dict]) -> list[dict]:
    found = [r for r in records if r["role"] in TMA_ROLES]
    assert {r["role"] for r in found} == set(TMA_ROLES)
    assert {r["shape"]["N"] for r in found if r["role"] == "forward-tma"} == set(LINEAR_NS)
    return found


def _mma_loop(sass: str) -> Counter:
    """Opcode counts of the innermost loop that issues wgmma (the K loop)."""
    instructions, labels = nvidia.parse_sass(sass)
    for loop in innermost(nvidia.sass_loops(instructions, labels)):
        body = instructions[loop.start : loop.end + 1]
        counts = Counter(ins.opcode.split(".")[0] for ins in body)
        if counts["HGMMA"]:
            return counts + Counter({"instructions": len(body)})
    raise AssertionError("no loop issues HGMMA")


def test_tma_plans_load_through_tma_and_multiply_with_wgmma(linear_report):
    for r in _tma(linear_report):
        assert r["kernel"] == "_linear_entropy_tma_fwd_kernel"
        assert r["mma"] == "wgmma", (r["role"], r["shape"])
        assert r["tma"], (r["role"], r["shape"])
        assert "UTMALDG" in Path(r["sass"]).read_text()
        assert "cp.async.bulk.tensor" in Path(r["ptx"]).read_text()


def test_tma_plans_do_not_spill_and_fill_the_gpu(linear_report):
    """No spills, the one resident program per SM that the persistent grid is sized for,
    and >= 0.90 of the GPU busy until the last tile for every benchmark N."""
    for r in _tma(linear_report):
        where = (r["role"], r["shape"], r["registers"])
        assert r["spill_bytes"] == 0, where
        assert r["ctas_per_sm"] == r["extra"]["ctas_per_sm"] == 1, where
        assert r["wave_efficiency"] >= 0.90, (*where, r["grid"], r["wave_efficiency"])


def test_tma_k_loop_has_no_per_thread_operand_loads(linear_report):
    """Every operand of the K loop comes through TMA (the hidden tile too, rows not
    gathered): no cp.async (LDGSTS) or plain global load left in it, and fewer instructions
    than the pointer kernel's K loop for the same role."""
    default_role = {"forward-tma": "forward", "frozen-head-tma": "frozen-head"}
    default_sass = {
        r["role"]: r["sass"] for r in linear_report if r["role"] in default_role.values()
    }
    for r in _tma(linear_report):
        loop = _mma_loop(Path(r["sass"]).read_text())
        assert loop["UTMALDG"] == 2 and loop["LDGSTS"] == 0 and loop["LDG"] == 0, loop
        pointer_loop = _mma_loop(Path(default_sass[default_role[r["role"]]]).read_text())
        assert pointer_loop["LDGSTS"] > 0  # what TMA replaces
        assert loop["instructions"] < pointer_loop["instructions"], (loop, pointer_loop)
