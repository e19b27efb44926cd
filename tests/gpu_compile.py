"""Compile every Triton kernel for an NVIDIA architecture without a GPU (run as a script).

The CPU interpreter runs kernels as Python, so it cannot catch what only the compiler sees:
values whose types differ between branches, early returns, shapes that ``tl.dot`` rejects,
register spills. Triton ships its own ``ptxas``, so the real compiler runs here too.
``TRITON_INTERPRET`` must be unset when the kernel modules are imported, which is why the
test runs this in a fresh process.

    python tests/gpu_compile.py 90     # sm_90 (Hopper); prints one line per variant
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="saei-aot-"))

import torch
import triton
from triton.backends.compiler import GPUTarget

from saei_fast.kernels import band_select, entropy_logits, linear_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Pointers holding the op's input dtype; every other pointer is float32 unless listed.
DATA_POINTERS = {
    "logits_ptr",
    "grad_logits_ptr",
    "hidden_ptr",
    "weight_ptr",
    "bias_ptr",
    "values_ptr",
}
POINTER_TYPES = {
    "labels_ptr": "*i64",
    "rows_ptr": "*i64",
    "mask_ptr": "*u8",
    "valid_ptr": "*u8",
    "out_ptr": "*u8",
    "bounds_ptr": "*i64",
    "work_seg_ptr": "*i64",
    "work_first_ptr": "*i64",
    "hist_ptr": "*i32",
    "state_ptr": "*i64",
}
SCALAR_TYPES = {"inv_temperature": "fp32", "lo_bits": "i64", "hi_bits": "i64", "seg_len": "i64"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in DATA_POINTERS:
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*fp32")
        elif name.startswith("stride") or name.startswith("row"):
            signature[name] = "i64"
        else:
            signature[name] = SCALAR_TYPES.get(name, "i32")
    return signature


def _flag_sets(count: int) -> list[tuple[bool, ...]]:
    # Every optional feature on, then every one off: each branch is compiled once, at a
    # fraction of the time of the full product.
    return [(True,) * count, (False,) * count]


def _variants():
    """(kernel, dtype, constexprs, num_warps, num_stages) for every kernel and dtype, with
    every optional feature on and with every one off."""
    for kernel in (entropy_logits._entropy_fwd_kernel, entropy_logits._entropy_bwd_kernel):
        for (labels, mask), dtype in itertools.product(_flag_sets(2), DTYPES):
            block = entropy_logits._block_v(151936, DTYPES[dtype].itemsize)
            consts = {"HAS_LABELS": labels, "HAS_MASK": mask, "BLOCK_V": block}
            if not labels:
                consts |= {"labels_ptr": None, "logprob_ptr": None, "grad_logprob_ptr": None}
            if not mask:
                consts["mask_ptr"] = None
            yield kernel, dtype, consts, entropy_logits._num_warps(block), 3
    for kernel in (
        linear_entropy._linear_entropy_fwd_kernel,
        linear_entropy._linear_entropy_grad_logits_kernel,
        linear_entropy._merge_splits_kernel,
    ):
        for (bias, rows, labels), dtype in itertools.product(_flag_sets(3), DTYPES):
            block_n, block_v, block_d, warps, stages = linear_entropy._gemm_blocks(DTYPES[dtype])
            consts = {
                "HAS_BIAS": bias,
                "HAS_ROWS": rows,
                "HAS_LABELS": labels,
                "BLOCK_N": block_n,
                "BLOCK_V": block_v,
                "BLOCK_D": block_d,
                "DOT_PRECISION": linear_entropy._dot_precision(DTYPES[dtype]),
                "BLOCK": 256,
            }
            if not bias:
                consts["bias_ptr"] = None
            if not rows:
                consts["rows_ptr"] = None
            if not labels:
                consts |= {
                    "labels_ptr": None,
                    "grad_logprob_ptr": None,
                    "part_label_ptr": None,
                    "logprob_ptr": None,
                }
            yield kernel, dtype, consts, warps, stages
    for kernel, tile in (
        (band_select._band_segment_kernel, "TILE"),
        (band_select._band_chunk_pass_kernel, "CHUNK"),
        (band_select._band_chunk_select_kernel, "CHUNK"),
    ):
        for (valid, uniform), dtype in itertools.product(_flag_sets(2), DTYPES):
            consts = {
                "HAS_VALID": valid,
                "UNIFORM": uniform,
                tile: 4096,
                "RADIX_BITS": band_select.RADIX_BITS,
                "NUM_BINS": band_select.NUM_BINS,
            }
            if uniform:
                consts |= {"bounds_ptr": None, "work_seg_ptr": None, "work_first_ptr": None}
            if not valid:
                consts["valid_ptr"] = None
            yield kernel, dtype, consts, 8, 3


def main(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for kernel, dtype, consts, warps, stages in _variants():
        consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
        flags = ",".join(f"{k}={v}" for k, v in consts.items() if isinstance(v, bool))
        source = triton.compiler.ASTSource(
            fn=kernel, signature=_signature(kernel, dtype, consts), constexprs=consts
        )
        try:
            compiled = triton.compile(
                source, target=target, options={"num_warps": warps, "num_stages": stages}
            )
        except Exception as error:  # report every variant, not only the first failure
            failures += 1
            print(f"FAIL {kernel.__name__} {dtype} {flags}: {str(error)[:2000]}")
            continue
        ptx = compiled.asm["ptx"]
        spills = ptx.count("ld.local") + ptx.count("st.local")
        print(f"ok {kernel.__name__} {dtype} {flags} spills={spills}")
    print(f"failures={failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
