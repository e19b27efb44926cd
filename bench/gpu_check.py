"""One-shot GPU check: correctness of every op against float64, then the timing table.

Meant for a short-lived GPU machine: one call, under 5 minutes, everything printed and also
written under ``--out`` (or ``$SAEI_BENCH_OUT``, else ``$OUT``): ``gpu_check.md`` /
``gpu_check.json`` (correctness + timings) and the ``saei-fast bench`` files ``bench.csv`` /
``bench.json`` / ``bench.md``. It first measures the device's copy bandwidth and bf16
matmul throughput (cached in ``peaks.json`` under the same directory), so the table states
the peaks its "% of peak" column is against.

    python bench/gpu_check.py --out "$OUT"            # on a GPU
    python bench/gpu_check.py --device cpu --quick     # tiny shapes: exercises the script

Beside each measured time of ours it prints the compile-time report's roofline estimate for
the same op, shape and dtype (``saei-fast kernels``; built here for the device's target unless
``--report`` names a ``report.json``), so the first GPU run also judges the model.

Correctness: entropy + log-probs on random and adversarial logits (peaked, uniform, huge,
-inf entries) here, and the ``correctness(device)`` sections of ``bench/gpu_<op>.py`` (band
selection exactness with ties, linear entropy accuracy rule). Timings: the benchmark
registry (``saei_fast.tools.benchmarks``), the same cases as ``pytest bench/`` and
``saei-fast bench``; cases left when the time budget runs out are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from saei_fast.ops import logprobs_and_entropy
from saei_fast.reference import logprobs_and_entropy_reference, naive_logprobs_and_entropy
from saei_fast.tools.benchmarks import cases_for
from saei_fast.tools.benchmarks.peaks import device_peaks
from saei_fast.tools.benchmarks.report import tables, write_outputs
from saei_fast.tools.benchmarks.runner import run_cases, run_info

OP_MODULES = ("gpu_band", "gpu_linear")


# -------------------------------------------------------------------------------------------
# Entropy from logits: correctness
# -------------------------------------------------------------------------------------------


def _special_logits(n: int, v: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, v, device=device, generator=gen, dtype=torch.float32) * 3
    x[0] = 0.0
    x[0, v // 3] = 60.0  # peaked
    x[1] = 0.0  # uniform
    x[2] = -1000.0 - x[2].abs()  # all large negative
    x[3, ::3] = float("-inf")  # masked vocabulary
    x[4] = 1000.0 + x[4]  # large positive
    return x.to(dtype)


def entropy_correctness(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    shapes = [(64, 2053)] if quick else [(512, 151936), (256, 128256), (77, 2053)]
    for n, v in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            logits = _special_logits(n, v, device, dtype)
            labels = torch.randint(0, v, (n,), device=device)
            labels[3] = 0  # on a -inf entry
            mask = torch.rand(n, device=device) > 0.1
            leaf = logits.clone().requires_grad_(True)
            logp, ent = logprobs_and_entropy(leaf, labels, temperature=0.7, mask=mask)
            finite = torch.isfinite(logp)
            (ent.sum() + logp.masked_fill(~finite, 0).sum()).backward()

            ref_leaf = logits.double().masked_fill(torch.isneginf(logits), -1e4)
            ref_leaf.requires_grad_(True)
            ref_logp, ref_ent = logprobs_and_entropy_reference(
                ref_leaf, labels, temperature=0.7, mask=mask
            )
            (ref_ent.sum() + ref_logp.masked_fill(~finite, 0).sum()).backward()
            _, naive_ent = naive_logprobs_and_entropy(logits[5:], labels[5:], temperature=0.7)
            err_ent = (ent.double() - ref_ent).abs().max().item()
            err_logp = (logp.double() - ref_logp)[finite].abs().max().item()
            err_grad = (leaf.grad.double() - ref_leaf.grad).abs().max().item()
            naive_err = (naive_ent.double() - ref_ent[5:]).abs().max().item()
            tol = 2e-5  # fp32 accumulation whatever the input dtype
            # Relative to the largest gradient for every dtype: the GPU's exp (ex2.approx)
            # and 152k-term sums make an absolute fp32 bound spurious; fp32 is held 1e-5
            # relative, bf16 to its rounding of the stored gradient.
            grad_scale = ref_leaf.grad.abs().max().item()
            grad_tol = (1e-5 if dtype == torch.float32 else 8e-3) * grad_scale
            rows.append(
                {
                    "op": "logprobs_and_entropy",
                    "case": f"{n}x{v} {str(dtype)[6:]} T=0.7 special rows",
                    "max_err": max(err_ent, err_logp),
                    "grad_err": err_grad,
                    "naive_err": naive_err,
                    "nan": bool(torch.isnan(ent).any() or torch.isnan(leaf.grad).any()),
                    "ok": err_ent < tol + 1e-5 * ref_ent.abs().max().item()
                    and err_logp < 1e-4
                    and err_grad < grad_tol
                    and not torch.isnan(leaf.grad).any(),
                }
            )
    return rows


# -------------------------------------------------------------------------------------------
# Compile-time estimates beside measured times
# -------------------------------------------------------------------------------------------

# Benchmark op names -> report op names.
REPORT_OPS = {"entropy": "entropy", "linear_entropy": "linear_entropy", "band": "band"}
REPORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def load_report(device: torch.device, out: Path, path: str | None) -> list[dict]:
    """The kernel report's records: ``path`` (a report.json), else built now for the
    device's target family (compiling takes well under a minute on a GPU host's CPUs)."""
    if path:
        return json.loads(Path(path).read_text())
    from saei_fast.kernels.plan import target_for
    from saei_fast.tools.kernel_report.build import build_report

    target = target_for(device)
    # AMD targets keep their family's name; NVIDIA ones are named after the device (sm_89).
    arch = target.name if target.is_amd else ("sm_90" if int(target.arch) >= 90 else "sm_80")
    records, problems = build_report(
        arch, out / "kernel-report", jobs=min(8, os.cpu_count() or 2), progress=lambda _: None
    )
    for problem in problems:
        print(f"kernel report: not reported: {problem}")
    return records


def _is_backward(role: str) -> bool:
    return role.startswith("bwd") or "backward" in role or "grad" in role


def report_estimate_us(records: list[dict], row: dict) -> float | None:
    """Sum of the report's estimates for the kernels one call of ``row``'s op runs: records of
    the same op, dtype and shape; forward only unless the mode includes the backward. A
    kernel reported in several variants (with/without labels) counts once, at its largest
    estimate. Work done outside the Triton kernels (cuBLAS GEMMs) is not in the report."""
    dims = tuple(int(d) for d in str(row["shape"]).split("x"))
    matches = {}
    for r in records:
        if (
            r["op"] == REPORT_OPS.get(row["op"])
            and r["dtype"] == REPORT_DTYPES.get(row["dtype"])
            and tuple(r["shape"].values()) == dims
            and ("backward" in row["mode"] or not _is_backward(r["role"]))
            # The opt-in TMA forward stands in for the default one; it has its own rows.
            and not r["role"].endswith("-tma")
        ):
            key = (r["kernel"], _is_backward(r["role"]))
            matches[key] = max(matches.get(key, 0.0), r["estimate_us"])
    return sum(matches.values()) if matches else None


def estimate_rows(records: list[dict], rows: list[dict]) -> list[dict]:
    table = []
    for row in rows:
        if row.get("kind") != "ours" or row.get("status") != "ok":
            continue
        estimate = report_estimate_us(records, row)
        measured_us = row["median_ms"] * 1e3
        table.append(
            {
                "op": row["op"],
                "mode": row["mode"],
                "shape": row["shape"],
                "dtype": row["dtype"],
                "measured_us": measured_us,
                "estimate_us": estimate,
                "measured/estimate": measured_us / estimate if estimate else None,
            }
        )
    return table


# -------------------------------------------------------------------------------------------
# The opt-in TMA forward (SAEI_LINEAR_TMA=1) beside the default forward
# -------------------------------------------------------------------------------------------

# The report's plans for these launches (bf16, V = 151936): the training forward (labels, the
# first chunk's logits kept) and the attack's forward over one chunk (no labels, all kept).
TMA_CASES = (("forward", 8192, 4096, True), ("frozen-head", 3456, 4096, False))
TMA_VOCAB = 151936
TMA_ROUNDS = 10


def _report_estimate(records: list[dict], role: str, shape: dict) -> float | None:
    for r in records:
        if r["role"] == role and r["dtype"] == "bf16" and r["shape"] == shape:
            return r["estimate_us"]
    return None


def tma_rows(device: torch.device, records: list[dict]) -> list[dict]:
    """Median time of the default forward and of the TMA forward on the same inputs, timed
    in interleaved rounds, each beside its report estimate (the GEMM kernel's; the split
    merge is a few microseconds), and their largest entropy / log-prob difference. Empty off
    sm_90 (the TMA forward runs there only)."""
    from gpu_linear import tma_device, tma_switch

    from saei_fast.kernels.linear_entropy.config import chunk_rows, gemm_config
    from saei_fast.kernels.plan import target_for
    from saei_fast.ops.linear_entropy.triton_path import fused_forward
    from saei_fast.tools.benchmarks.timing import interleaved

    if device.type != "cuda" or not tma_device(device):
        return []
    V, dtype = TMA_VOCAB, torch.bfloat16
    block_n = gemm_config(target_for(device), dtype).block_n
    rows = []
    for role, n, d, with_labels in TMA_CASES:
        gen = torch.Generator(device=device).manual_seed(n + d)
        hidden = torch.randn(n, d, device=device, generator=gen).to(dtype)
        weight = (torch.randn(V, d, device=device, generator=gen) * d**-0.5).to(dtype)
        labels = torch.randint(0, V, (n,), device=device, generator=gen) if with_labels else None
        kept = torch.empty(min(n, chunk_rows(dtype, V, block_n)), V, device=device, dtype=dtype)

        def forward(tma: bool, hidden=hidden, weight=weight, labels=labels, kept=kept):
            # The host's choice of forward reads the switch (the kernels never do).
            with tma_switch(tma):
                return fused_forward(hidden, weight, None, None, labels, 1.0, logits_out=kept)

        forward(False), forward(True)  # compiles both
        results = {tma: forward(tma) for tma in (False, True)}
        torch.cuda.synchronize(device)
        timings, errors = interleaved(
            {"default": lambda f=forward: f(False), "tma": lambda f=forward: f(True)},
            device,
            TMA_ROUNDS,
        )
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(results[False], results[True], strict=True)
            if a is not None
        )
        for name, tma_role in (("default", role), ("tma", f"{role}-tma")):
            timing = timings.get(name)
            estimate = _report_estimate(records, tma_role, {"N": n, "D": d, "V": V})
            rows.append(
                {
                    "op": "linear_entropy forward",
                    "kernel": name,
                    "role": tma_role,
                    "shape": f"{n}x{d}x{V}",
                    "dtype": str(dtype)[6:],
                    "measured_us": None if timing is None else timing.median_ms * 1e3,
                    "min_us": None if timing is None else timing.min_ms * 1e3,
                    "max_us": None if timing is None else timing.max_ms * 1e3,
                    "estimate_us": estimate,
                    "max_diff_vs_default": diff if name == "tma" else 0.0,
                    "error": str(errors[name]) if name in errors else "",
                }
            )
        del hidden, weight, kept, results
        torch.cuda.empty_cache()
    return rows


# -------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per op")
    parser.add_argument(
        "--out", default=os.environ.get("SAEI_BENCH_OUT") or os.environ.get("OUT", "gpu-check-out")
    )
    parser.add_argument("--ops", default=None, help="comma-separated ops to time (default: all)")
    parser.add_argument(
        "--report", default=None, help="report.json of saei-fast kernels (default: build it)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=270.0, help="wall-clock budget of the whole check"
    )
    args = parser.parse_args()
    start = time.monotonic()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = run_info(device)
    print(json.dumps(info), flush=True)
    peaks = device_peaks(device, cache_dir=out)
    print(f"peaks: {json.dumps(peaks)}", flush=True)

    correctness = entropy_correctness(device, args.quick)
    failures = []
    for module_name in OP_MODULES:
        try:
            module = importlib.import_module(module_name)
            correctness.extend(module.correctness(str(device)))
        except Exception:
            failures.append(f"{module_name}.correctness:\n{traceback.format_exc()}")
    print("\n## Correctness vs float64\n")
    print(_markdown(correctness), flush=True)

    ops = [op.strip() for op in args.ops.split(",")] if args.ops else None
    rows = run_cases(
        cases_for(ops, device, quick=args.quick),
        device,
        quick=args.quick,
        peaks=peaks,
        deadline=start + args.budget_s,
    )
    table = tables(rows, info, peaks)
    print("## Timings\n")
    print(table)
    records = []
    try:
        records = load_report(device, out, args.report)
        estimates = estimate_rows(records, rows)
    except Exception:  # the estimates are context; a failure must not hide the timings
        failures.append(f"kernel report:\n{traceback.format_exc()}")
        estimates = []
    print("## Measured vs compile-time roofline estimate (estimates, not measurements)\n")
    print(_markdown(estimates), flush=True)
    try:  # the opt-in TMA forward, timed beside the default one (sm_90 only)
        tma = tma_rows(device, records)
    except Exception:
        failures.append(f"TMA forward rows:\n{traceback.format_exc()}")
        tma = []
    print("## Linear forward: default vs opt-in TMA (SAEI_LINEAR_TMA=1; sm_90 only)\n")
    print(_markdown(tma), flush=True)
    write_outputs(out, rows, info, peaks)
    for failure in failures:
        print("FAILED", failure)

    report = {
        "info": info,
        "peaks": peaks,
        "correctness": correctness,
        "timings": rows,
        "estimates": estimates,
        "tma_forward": tma,
        "failures": failures,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(
        f"{json.dumps(info)}\n\n## Correctness vs float64\n\n{_markdown(correctness)}\n"
        f"## Timings\n\n{table}\n"
        "## Measured vs compile-time roofline estimate (estimates, not measurements)\n\n"
        f"{_markdown(estimates)}\n"
        "## Linear forward: default vs opt-in TMA (SAEI_LINEAR_TMA=1; sm_90 only)\n\n"
        f"{_markdown(tma)}"
    )
    timing_errors = [r for r in rows if r["status"] in ("error", "oom")]
    ok = all(row.get("ok", True) for row in correctness) and not failures
    print(f"{len(timing_errors)} timing cases failed (see the tables)")
    print("ALL CORRECTNESS CHECKS OK" if ok else "SOME CHECKS FAILED")
    print(f"done in {time.monotonic() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
