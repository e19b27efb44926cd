"""Counting GEMM-sized products along a path (tests share it): the fused Triton kernels'
launches that multiply over the whole of ``D x V`` and every ``torch.mm`` / ``addmm``."""

from __future__ import annotations

import torch


class CountingKernel:
    """Stands in for a Triton kernel: records the rows of each launch that runs tl.dot over
    the whole of D x V (the forward; the gradient pass unless it reads kept logits)."""

    def __init__(self, kernel, products: list):
        self.kernel, self.products = kernel, products
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args, strict=False)) | kwargs
            if not named.get("FROM_LOGITS", False):
                self.products.append(named["n_rows"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def count_gemms(monkeypatch, run, n_rows: int, d: int, v: int) -> float:
    """GEMM-sized products (``2 * n_rows * d * v`` FLOPs each) that ``run()`` performs: the
    Triton GEMM kernels' launches and every torch.mm / addmm, by their sizes."""
    from saei_fast.kernels.linear_entropy import launch as kernels

    rows = []
    for name in ("_linear_entropy_fwd_kernel", "_linear_entropy_grad_logits_kernel"):
        monkeypatch.setattr(kernels, name, CountingKernel(getattr(kernels, name), rows))
    flops = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
            return out

        return wrapper

    monkeypatch.setattr(torch, "mm", counted(torch.mm))
    monkeypatch.setattr(torch, "addmm", counted(torch.addmm))
    monkeypatch.setattr(torch.Tensor, "addmm_", counted(torch.Tensor.addmm_))
    run()
    monkeypatch.undo()
    total = sum(flops) + sum(2 * r * d * v for r in rows)
    return total / (2 * n_rows * d * v)
