"""Linear entropy checks for the single GPU check script: correctness and timings.

``correctness(device)`` compares every implementation (fused Triton kernels, chunked Triton
variant, frozen-lm_head fast path, recompute path, PyTorch path, the loss head
``linear_token_loss``, and on sm_90 the fused path with the opt-in TMA forward) with float64
truth on the same device and applies the accuracy rule: ours may be no less accurate than
naive PyTorch in the same dtype, plus a small per-dtype allowance. ``timings(device)``
returns the benchmark registry's linear-entropy rows (ours vs naive vs chunked PyTorch and
the peers installed on CUDA). Both run on a CPU too, with tiny shapes (the Triton variants
only under ``TRITON_INTERPRET=1``).

    python bench/gpu_linear.py cuda
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import torch

from saei_fast.ops.dispatch import triton_available, triton_interpreting
from saei_fast.ops.linear_entropy.op import _linear_logprobs_and_entropy_variant
from saei_fast.ops.linear_loss import linear_token_loss
from saei_fast.reference import (
    linear_logprobs_and_entropy_reference,
    naive_linear_entropy,
    naive_linear_logprobs_and_entropy,
)

# Allowed excess over naive PyTorch's own error in the same dtype (values in nats; gradients
# relative to the largest true gradient entry).
EXTRA_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# name: internal options of the private hook _linear_logprobs_and_entropy_variant
VARIANTS = {
    "triton-fused": dict(impl="triton"),
    # Chunks of 256 rows: the training path keeps the first chunk's logits from the forward
    # and recomputes the other rows in the backward, so both halves run on the device.
    "triton-fused-kept-256": dict(impl="triton", chunk_rows=256),
    "triton-chunked": dict(impl="triton", fused=False),
    "triton-recompute": dict(impl="triton", input_grad_in_forward=False),
    "torch": dict(impl="torch"),
}


def _variants(device: torch.device) -> dict:
    triton_ok = triton_available() and (device.type == "cuda" or triton_interpreting())
    return {k: v for k, v in VARIANTS.items() if triton_ok or v["impl"] == "torch"}


# The fused path with SAEI_LINEAR_TMA=1: the opt-in TMA forward (kernels/linear_entropy/tma.py),
# checked wherever it can run (sm_90, or the interpreter).
TMA_VARIANT = "triton-fused-tma"


def tma_device(device: torch.device) -> bool:
    """Whether the TMA forward runs on ``device`` (an sm_90 CUDA device or the interpreter)."""
    if not triton_available():
        return False
    if device.type == "cuda" and not getattr(torch.version, "hip", None):
        return torch.cuda.get_device_capability(device)[0] == 9
    return device.type == "cpu" and triton_interpreting()


@contextlib.contextmanager
def tma_switch(on: bool):
    """``SAEI_LINEAR_TMA`` set to ``on`` inside the block (read by each forward launch),
    restored after it."""
    saved = os.environ.get("SAEI_LINEAR_TMA")
    os.environ["SAEI_LINEAR_TMA"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAEI_LINEAR_TMA", None)
        else:
            os.environ["SAEI_LINEAR_TMA"] = saved


def _inputs(n, d, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, device=device, generator=gen)
    weight = torch.randn(v, d, device=device, generator=gen) * (3.0 / math.sqrt(d))
    bias = torch.randn(v, device=device, generator=gen) * 0.5
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    mask = torch.rand(n, device=device, generator=gen) > 0.2
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, mask


def _max_err(ours: torch.Tensor, truth: torch.Tensor) -> float:
    return (ours.double() - truth.double()).abs().max().item() if truth.numel() else 0.0


def _values_and_grads(fn, hidden, weight, bias, g_entropy, g_logprobs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = fn(*leaves)
    (g_entropy * ent.double() + g_logprobs * logp.double()).sum().backward()
    return [logp.detach(), ent.detach()] + [leaf.grad for leaf in leaves]


def _labels_case(device, dtype, n, d, v, variant, options) -> list[dict]:
    hidden, weight, bias, labels, mask = _inputs(n, d, v, dtype, device, seed=v + n)
    gen = torch.Generator(device=device).manual_seed(1)
    g_entropy = torch.randn(n, device=device, generator=gen, dtype=torch.float64)
    g_logprobs = torch.randn(n, device=device, generator=gen, dtype=torch.float64)
    ours = _values_and_grads(
        lambda h, w, b: _linear_logprobs_and_entropy_variant(
            h, w, labels, bias=b, temperature=0.8, mask=mask, **options
        ),
        hidden, weight, bias, g_entropy, g_logprobs,
    )  # fmt: skip
    truth = _values_and_grads(
        lambda h, w, b: linear_logprobs_and_entropy_reference(
            h, w, labels, bias=b, temperature=0.8, mask=mask
        ),
        hidden.double(), weight.double(), bias.double(), g_entropy, g_logprobs,
    )  # fmt: skip

    def naive_fn(h, w, b):
        logp, ent = naive_linear_logprobs_and_entropy(h, w, labels, bias=b, temperature=0.8)
        zero = torch.zeros((), dtype=ent.dtype, device=device)
        return torch.where(mask, logp, zero), torch.where(mask, ent, zero)

    naive = _values_and_grads(naive_fn, hidden, weight, bias, g_entropy, g_logprobs)
    rows = []
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, o, t, nv in zip(names, ours, truth, naive, strict=True):
        scale = 1.0 if name in ("logprobs", "entropy") else max(t.abs().max().item(), 1e-30)
        err, naive_err = _max_err(o, t) / scale, _max_err(nv, t) / scale
        rows.append(
            {
                "op": "linear_logprobs_and_entropy",
                "case": f"{variant} {str(dtype)[6:]} {n}x{d}x{v} {name}",
                "max_err": err,
                "naive_err": naive_err,
                "ok": bool(err <= naive_err + EXTRA_TOL[dtype]),
            }
        )
    return rows


def _frozen_head_case(device, dtype, n, d, v, variant, options) -> list[dict]:
    """The attack's case: entropy only, frozen lm_head, gradient w.r.t. hidden only (taken in
    the forward by default; through the general backward, kept or recomputed logits, by the
    ``-recompute`` variant)."""
    hidden, weight, bias, _, mask = _inputs(n, d, v, dtype, device, seed=v + n + 1)
    gen = torch.Generator(device=device).manual_seed(2)
    g_entropy = torch.randn(n, device=device, generator=gen, dtype=torch.float64)

    def run(fn, h):
        leaf = h.detach().clone().requires_grad_(True)
        ent = fn(leaf)
        (g_entropy * ent.double()).sum().backward()
        return ent.detach(), leaf.grad

    ours = run(
        lambda h: _linear_logprobs_and_entropy_variant(
            h, weight, None, bias=bias, temperature=1.3, mask=mask, **options
        )[1],
        hidden,
    )
    truth = run(
        lambda h: linear_logprobs_and_entropy_reference(
            h, weight.double(), torch.zeros_like(mask, dtype=torch.long), bias=bias.double(),
            temperature=1.3, mask=mask,
        )[1],
        hidden.double(),
    )  # fmt: skip

    def naive_fn(h):
        ent = naive_linear_entropy(h, weight, bias=bias, temperature=1.3)
        return torch.where(mask, ent, torch.zeros((), dtype=ent.dtype, device=device))

    naive = run(naive_fn, hidden)
    rows = []
    for name, o, t, nv in zip(("entropy", "grad_hidden"), ours, truth, naive, strict=True):
        scale = 1.0 if name == "entropy" else max(t.abs().max().item(), 1e-30)
        err, naive_err = _max_err(o, t) / scale, _max_err(nv, t) / scale
        rows.append(
            {
                "op": "linear_entropy (frozen lm_head)",
                "case": f"{variant} {str(dtype)[6:]} {n}x{d}x{v} {name}",
                "max_err": err,
                "naive_err": naive_err,
                "ok": bool(err <= naive_err + EXTRA_TOL[dtype]),
            }
        )
    return rows


def _token_loss_case(device, dtype, n, d, v, variant, options) -> list[dict]:
    """``linear_token_loss`` (gradients formed in the forward) on a loss linear in the
    per-token log-probs and entropies: its loss and gradients against float64 truth, with
    naive PyTorch in the same dtype as the allowance."""
    hidden, weight, bias, labels, mask = _inputs(n, d, v, dtype, device, seed=v + n + 2)
    gen = torch.Generator(device=device).manual_seed(3)
    g_entropy = torch.randn(n, device=device, generator=gen, dtype=torch.float64)
    g_logprobs = torch.randn(n, device=device, generator=gen, dtype=torch.float64)

    def token_loss(logprobs, entropy, index):
        return g_logprobs[index] * logprobs.double() + g_entropy[index] * entropy.double()

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = linear_token_loss(
        leaves[0], leaves[1], labels, token_loss, bias=leaves[2], temperature=0.8, mask=mask,
        **options,
    )  # fmt: skip
    loss.backward()
    ours = [loss.detach()] + [leaf.grad for leaf in leaves]

    def summed(fn, *tensors):
        logp, ent, *grads = _values_and_grads(fn, *tensors, g_entropy, g_logprobs)
        return [(g_entropy * ent.double() + g_logprobs * logp.double()).sum(), *grads]

    truth = summed(
        lambda h, w, b: linear_logprobs_and_entropy_reference(
            h, w, labels, bias=b, temperature=0.8, mask=mask
        ),
        hidden.double(), weight.double(), bias.double(),
    )  # fmt: skip

    def naive_fn(h, w, b):
        logp, ent = naive_linear_logprobs_and_entropy(h, w, labels, bias=b, temperature=0.8)
        zero = torch.zeros((), dtype=ent.dtype, device=device)
        return torch.where(mask, logp, zero), torch.where(mask, ent, zero)

    naive = summed(naive_fn, hidden, weight, bias)
    rows = []
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    for name, o, t, nv in zip(names, ours, truth, naive, strict=True):
        scale = max(t.abs().max().item(), 1.0 if name == "loss" else 1e-30)
        err, naive_err = _max_err(o, t) / scale, _max_err(nv, t) / scale
        rows.append(
            {
                "op": "linear_token_loss",
                "case": f"{variant} {str(dtype)[6:]} {n}x{d}x{v} {name}",
                "max_err": err,
                "naive_err": naive_err,
                "ok": bool(err <= naive_err + EXTRA_TOL[dtype]),
            }
        )
    return rows


def _special_rows_case(device, dtype, v, variant, options) -> dict:
    """Peaked and all-negative logits (weight = identity, so logits = hidden): the last
    vocabulary tile's padding columns must not add exp(0)."""
    gen = torch.Generator().manual_seed(v)
    rows = torch.randn(5, v, generator=gen, dtype=torch.float64)
    rows[0] = -30.0
    rows[0, v // 2] = 30.0
    rows[1] = -1000.0 - rows[1].abs()
    rows[2] = -40.0 + rows[2]
    rows[3] = 0.0
    rows[4] = 1000.0 + rows[4]
    hidden = rows.to(device, dtype)
    weight = torch.eye(v, device=device, dtype=dtype)
    labels = torch.arange(5, device=device) % v
    logp, ent = _linear_logprobs_and_entropy_variant(hidden, weight, labels, **options)
    true_logp, true_ent = linear_logprobs_and_entropy_reference(hidden, weight, labels)
    err = max(_max_err(ent, true_ent), _max_err(logp, true_logp))
    return {
        "op": "linear_logprobs_and_entropy",
        "case": f"{variant} {str(dtype)[6:]} peaked/all-negative V={v}",
        "max_err": err,
        "ok": bool(err <= 1e-4),
    }


def correctness(device: str) -> list[dict]:
    """One row per (implementation, dtype, shape, quantity): ``op, case, max_err, ok``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        # Real vocabularies, D a multiple and a non-multiple of the D tile, N not a multiple
        # of the row tile; V = 2053 is prime.
        shapes = [(1000, 1024, 151936), (333, 3584, 152064), (77, 1000, 2053)]
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        special_vs = [2053, 130]
    else:
        shapes, dtypes, special_vs = [(9, 40, 130)], [torch.float32], [37]
    variants = [(name, options, False) for name, options in _variants(dev).items()]
    if tma_device(dev):
        variants.append((TMA_VARIANT, VARIANTS["triton-fused"], True))
    results = []
    for variant, options, tma in variants:
        with tma_switch(tma):
            for dtype in dtypes:
                for n, d, v in shapes:
                    results += _labels_case(dev, dtype, n, d, v, variant, options)
                    results += _frozen_head_case(dev, dtype, n, d, v, variant, options)
                    if set(options) <= {"impl", "chunk_rows"}:  # the options the loss takes
                        results += _token_loss_case(dev, dtype, n, d, v, variant, options)
            for v in special_vs:
                results.append(_special_rows_case(dev, torch.float32, v, variant, options))
    return results


# -------------------------------------------------------------------------------------------
# Timings
# -------------------------------------------------------------------------------------------


def timings(device: str) -> list[dict]:
    """The registry's linear-entropy rows (``saei_fast.tools.benchmarks.linear_cases``): one per
    (shape, mode, provider), with ms, nominal and executed TFLOP/s and peak memory; CPU runs
    use the ``--quick`` shape."""
    from saei_fast.tools.benchmarks import cases_for
    from saei_fast.tools.benchmarks.runner import run_cases

    dev = torch.device(device)
    return run_cases(cases_for(["linear_entropy"], dev, quick=dev.type == "cpu"), dev)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = correctness(target)
    print(json.dumps(rows, indent=1))
    print(json.dumps(timings(target), indent=1))
    sys.exit(0 if all(row["ok"] for row in rows) else 1)
