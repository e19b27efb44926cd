"""One-shot GPU check: correctness of every op against float64, then one timing table.

Meant for a short-lived GPU machine: one call, a few minutes, everything printed and also
written under ``--out`` (markdown + JSON). It first measures the device's copy bandwidth so
memory-bound ops are reported as a fraction of what this card actually delivers.

    python bench/gpu_check.py --out "$OUT"            # on a GPU
    python bench/gpu_check.py --device cpu --quick     # tiny shapes: exercises the script

The per-op sections of other ops live in ``bench/gpu_<op>.py`` modules exposing
``correctness(device) -> list[dict]`` and ``timings(device) -> list[dict]``; each present
module is run here.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import run_info

from saei_fast.ops import logprobs_and_entropy
from saei_fast.reference import (
    chunked_entropy,
    logprobs_and_entropy_reference,
    naive_logprobs_and_entropy,
)

OP_MODULES = ("gpu_band", "gpu_linear")


# -------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------


def time_ms(fn, device: torch.device, *, warmup: int = 3, repeats: int = 10) -> tuple[float, float]:
    """Median and spread (max - min) in ms of ``fn()``, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return samples[len(samples) // 2], samples[-1] - samples[0]


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Achieved bytes/s of a device-to-device copy (read + write), the memory-bound peak."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    median_ms, _ = time_ms(lambda: dst.copy_(src), device, repeats=20)
    return 2 * src.numel() * 2 / (median_ms / 1e3)


def peak_extra_memory(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


# -------------------------------------------------------------------------------------------
# Entropy from logits
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
            grad_tol = 1e-6 if dtype == torch.float32 else 8e-3 * ref_leaf.grad.abs().max().item()
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


def entropy_timings(device: torch.device, quick: bool, bandwidth: float) -> list[dict]:
    shapes = [(256, 4096)] if quick else [(4096, 151936), (8192, 128256), (8192, 151936)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def ours(x, y):
        logp, ent = logprobs_and_entropy(x, y)
        return ent.sum() + logp.sum()

    def naive(x, y):
        logp, ent = naive_logprobs_and_entropy(x, y)
        return ent.float().sum() + logp.float().sum()

    def chunked(x, y):
        return chunked_entropy(x, chunk_size=1024).sum()

    providers = {"ours": ours, "naive": naive, "chunked (entropy only)": chunked}
    compiled = functools.cache(lambda: torch.compile(naive))
    providers["torch.compile(naive)"] = lambda x, y: compiled()(x, y)
    try:
        from trl.trainer.utils import entropy_from_logits as trl_entropy

        providers["trl.entropy_from_logits (entropy only)"] = lambda x, y: trl_entropy(x).sum()
    except Exception as error:
        print(f"  skipped peer trl.entropy_from_logits: {type(error).__name__}: {error}")

    rows = []
    for n, v in shapes:
        logits = torch.randn(n, v, device=device, dtype=dtype)
        labels = torch.randint(0, v, (n,), device=device)
        size = logits.numel() * logits.element_size()
        for name, fn in providers.items():
            for mode in ("forward", "forward+backward"):
                if mode == "forward":
                    call = functools.partial(_no_grad_call, fn, logits, labels)
                    moved = size
                else:
                    leaf = logits.detach().requires_grad_(True)
                    call = functools.partial(_backward_call, fn, leaf, labels)
                    moved = 3 * size
                try:
                    median, spread = time_ms(call, device)
                    peak = peak_extra_memory(call, device)
                except torch.OutOfMemoryError:
                    rows.append(
                        {
                            "op": "entropy",
                            "provider": name,
                            "mode": mode,
                            "shape": f"{n}x{v}",
                            "ms": "OOM",
                        }
                    )
                    torch.cuda.empty_cache()
                    continue
                gbps = moved / (median / 1e3) / 1e9
                rows.append(
                    {
                        "op": "entropy",
                        "provider": name,
                        "mode": mode,
                        "shape": f"{n}x{v} {str(dtype)[6:]}",
                        "ms": round(median, 3),
                        "spread_ms": round(spread, 3),
                        "GB/s": round(gbps, 1),
                        "% of copy bw": round(100 * gbps * 1e9 / bandwidth, 1),
                        "peak_extra_MiB": None if peak is None else round(peak / 2**20),
                    }
                )
        del logits
    return rows


def _no_grad_call(fn, x, y):
    with torch.no_grad():
        return fn(x, y)


def _backward_call(fn, leaf, y):
    leaf.grad = None
    fn(leaf, y).backward()


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
    parser.add_argument("--quick", action="store_true", help="tiny shapes (script self-test)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = run_info()
    print(json.dumps(info))
    bandwidth = copy_bandwidth(device, (64 if args.quick else 2048) * 2**20)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")

    correctness = entropy_correctness(device, args.quick)
    timings: list[dict] = []
    failures = []
    for module_name in OP_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            print(f"  no section {module_name}: {error}")
            continue
        for part, sink in (("correctness", correctness), ("timings", timings)):
            try:
                sink.extend(getattr(module, part)(str(device)))
            except Exception:
                failures.append(f"{module_name}.{part}:\n{traceback.format_exc()}")
    print("\n## Correctness vs float64\n")
    print(_markdown(correctness))
    timings = entropy_timings(device, args.quick, bandwidth) + timings
    print("## Timings\n")
    print(_markdown(timings))
    for failure in failures:
        print("FAILED", failure)

    report = {
        "info": info,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "correctness": correctness,
        "timings": timings,
        "failures": failures,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(
        f"{json.dumps(info)}\n\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s\n\n"
        + _markdown(correctness)
        + "\n"
        + _markdown(timings)
    )
    ok = all(row.get("ok", True) for row in correctness) and not failures
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
