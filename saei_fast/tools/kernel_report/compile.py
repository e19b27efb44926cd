"""Compile a :class:`LaunchPlan` for a GPU :class:`Target` on a machine without that GPU.

The compile runs in worker processes started without ``TRITON_INTERPRET``: ``triton.jit``
reads that variable when a kernel is defined, so kernels imported under the interpreter
cannot be compiled. Each worker imports the kernel modules itself and asks them for their
plans, so only plain data (module names, plan indices, results) crosses processes.

A plan is compiled with the specialisation a real launch of its shape gets: every argument
named in ``plan.aligned`` carries Triton's divisibility-16 attribute (``tt.divisibility``,
what the launcher's ``"D"`` specialisation of a 16-byte-aligned pointer or a multiple-of-16
integer becomes), which is what lets the compiler emit 128-bit loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import time
from pathlib import Path
from typing import Any

# The kernel modules the report knows, by the names ``--ops`` takes.
OP_MODULES = {
    "entropy": "saei_fast.kernels.entropy.plans",
    "linear": "saei_fast.kernels.linear_entropy.plans",
    "band": "saei_fast.kernels.band.plans",
}

# What Triton's launcher turns a "D" (divisible by 16) specialisation into.
DIVISIBILITY_16 = [["tt.divisibility", 16]]


def worker_environment() -> dict[str, str | None]:
    """Environment changes for compile workers (None = unset): no interpreter, and Triton's
    current default of FP fusion stated explicitly (the value a real launch uses), which
    silences its warning about a future default."""
    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    return {"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": fusion}


@functools.cache
def plans_of(module_name: str, target_name: str) -> list:
    """``benchmark_plans(target)`` of a kernel module (cached per worker process)."""
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise RuntimeError("kernel plans must be built with TRITON_INTERPRET unset")
    from saei_fast.kernels.plan import TARGETS

    module = importlib.import_module(module_name)
    if not hasattr(module, "benchmark_plans"):
        raise LookupError(f"{module_name} has no benchmark_plans(target)")
    return list(module.benchmark_plans(TARGETS[target_name]))


def kernel_name(plan) -> str:
    fn = getattr(plan.kernel, "fn", plan.kernel)
    return fn.__name__


def variant_key(plan) -> str:
    """Identity of the compiled binary: plans with equal keys compile to the same code.

    The kernel is named by its op and function name, not by its module, so that moving a
    kernel to another file leaves its variant id (and its binaries' file names) unchanged."""
    fn = getattr(plan.kernel, "fn", plan.kernel)
    parts = (
        f"{plan.op}.{fn.__qualname__}",
        sorted(plan.signature.items()),
        sorted((k, repr(v)) for k, v in plan.constexprs.items()),
        sorted(plan.aligned),
        plan.num_warps,
        plan.num_stages,
        sorted((k, repr(v)) for k, v in plan.extra.get("options", {}).items()),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def describe(module_name: str, target_name: str) -> list[dict]:
    """Plain-data description of every plan of a module (run in a worker)."""
    from saei_fast.kernels.plan import TRITON_DTYPE

    described = []
    for index, plan in enumerate(plans_of(module_name, target_name)):
        described.append(
            {
                "module": module_name,
                "index": index,
                "key": variant_key(plan),
                "op": plan.op,
                "kernel": kernel_name(plan),
                "role": plan.role,
                "dtype": TRITON_DTYPE.get(plan.dtype, str(plan.dtype)),
                "shape": dict(plan.shape),
                "config": _jsonable(plan.config),
                "num_warps": plan.num_warps,
                "grid": list(plan.grid),
                "loop_elements": plan.loop_elements,
                "bytes_moved": int(plan.bytes_moved),
                "flops": int(plan.flops),
                "extra": _jsonable({k: v for k, v in plan.extra.items() if k != "options"}),
            }
        )
    return described


def source_for(plan):
    """Triton's ``ASTSource`` for a plan, with the real launch's specialisation."""
    from triton.compiler import ASTSource

    fn = plan.kernel
    signature = dict(plan.signature)
    for name in plan.constexprs:
        signature[name] = "constexpr"
    missing = [n for n in fn.arg_names if n not in signature]
    if missing:
        raise ValueError(f"plan for {kernel_name(plan)} does not type arguments {missing}")
    unknown = [n for n in plan.aligned if n not in fn.arg_names]
    if unknown:
        raise ValueError(f"plan.aligned names no argument of {kernel_name(plan)}: {unknown}")
    attrs = {(fn.arg_names.index(name),): DIVISIBILITY_16 for name in plan.aligned}
    ordered = {name: signature[name] for name in fn.arg_names}
    return ASTSource(fn, ordered, dict(plan.constexprs), attrs)


def gpu_target(target):
    from triton.backends.compiler import GPUTarget

    return GPUTarget(target.backend, target.arch, target.warp_size)


def compile_plan(module_name: str, index: int, target_name: str, out_dir: str) -> dict:
    """Compile one plan, write its binary and assembly under ``out_dir``, and return the
    report fields that depend on the binary only (run in a worker)."""
    import triton

    from saei_fast.kernels.plan import TARGETS
    from saei_fast.tools.kernel_report import amd, nvidia

    target = TARGETS[target_name]
    plan = plans_of(module_name, target_name)[index]
    started = time.perf_counter()
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    options.update(plan.extra.get("options", {}))
    try:
        compiled = triton.compile(source_for(plan), target=gpu_target(target), options=options)
    except Exception as error:
        # Triton chains a CompilationError per inlined function; the innermost one says why.
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        last = (str(root).strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{type(root).__name__}: {last}") from None
    seconds = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{plan.op}-{kernel_name(plan).strip('_')}-{variant_key(plan)}"
    has_dot = any(t in compiled.asm["ttgir"] for t in ("tt.dot", "warp_group_dot", "tc_gen5_mma"))
    shared = int(compiled.metadata.shared)
    if target.is_amd:
        asm = compiled.asm["amdgcn"]
        (out / f"{stem}.hsaco").write_bytes(compiled.asm["hsaco"])
        (out / f"{stem}.amdgcn").write_text(asm)
        fields = amd.analyse(asm, compiled.asm["llir"], has_dot, shared, plan.num_warps)
        files = {"hsaco": f"{stem}.hsaco", "amdgcn": f"{stem}.amdgcn"}
        files |= {"cubin": files["hsaco"], "sass": files["amdgcn"]}
    else:
        cubin = out / f"{stem}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass, fields = nvidia.analyse(
            cubin, compiled.asm["ptx"], has_dot, shared, plan.num_warps, int(target.arch)
        )
        (out / f"{stem}.sass").write_text(sass)
        (out / f"{stem}.ptx").write_text(compiled.asm["ptx"])
        files = {"cubin": cubin.name, "sass": f"{stem}.sass", "ptx": f"{stem}.ptx"}
    return {**fields, "files": files, "compile_s": round(seconds, 2)}
