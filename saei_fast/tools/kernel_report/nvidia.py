"""Read an NVIDIA kernel binary: registers, spills, load widths, MMA kind, hot-loop size.

The cubin is disassembled with the ``nvdisasm`` / ``cuobjdump`` that ship with Triton, so
nothing here needs a GPU or a CUDA install. The steady-state loop is the innermost loop of
the SASS branch structure (a backward branch and its target) that moves the most global
memory; ptxas may unroll it, so its size is divided by the unroll factor, which is the ratio
of the global memory bits it moves to those of the same loop in the PTX (Triton does not
unroll loops before ptxas, so the PTX loop is one source iteration).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

from saei_fast.tools.kernel_report.loops import Loop, innermost, pick_hot

# Per-SM resources of the architectures the report targets (CUDA programming guide,
# "compute capabilities" table): 64K registers, 64 resident warps, 32 resident CTAs; shared
# memory per SM (228 KiB on sm_90, 164 KiB on sm_80), of which the driver reserves 1 KiB per
# CTA. Registers are allocated per warp in units of 256.
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {90: 64, 80: 64}
MAX_CTAS_PER_SM = 32
SHARED_PER_SM = {90: 233472, 80: 167936}
SHARED_RESERVED_PER_CTA = 1024
REGISTER_ALLOCATION_UNIT = 256
MAX_REGISTERS_PER_THREAD = 255

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_WIDTH_SUFFIX = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with Triton (``nvdisasm``, ``cuobjdump``)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def disassemble(cubin: Path) -> str:
    """SASS of a cubin, as ``nvdisasm -c`` prints it (code only, with branch labels)."""
    return subprocess.run(
        [tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True, text=True
    ).stdout


def resource_usage(cubin: Path) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the kernel, from ``cuobjdump -res-usage``."""
    text = subprocess.run(
        [tool("cuobjdump"), "-res-usage", str(cubin)], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{text}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, match.groups()), strict=True))


@dataclasses.dataclass(frozen=True)
class Instruction:
    offset: int
    opcode: str  # e.g. "LDG.E.128"
    operands: str


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions in address order, and the offset of each ``.L_x_N`` label."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if match is None:
            continue
        offset = int(match.group(1), 16)
        for name in pending:
            labels[name] = offset
        pending.clear()
        instructions.append(Instruction(offset, match.group(3), match.group(4).strip()))
    return instructions, labels


def sass_loops(instructions: list[Instruction], labels: dict[str, int]) -> list[Loop]:
    """Every loop as ``[first, last]`` instruction indices: a branch to an earlier label.

    The self-branch nvdisasm shows after the final ``EXIT`` (a trap for runaway warps) is not
    a loop."""
    index_of = {ins.offset: i for i, ins in enumerate(instructions)}
    loops: dict[int, int] = {}
    for i, ins in enumerate(instructions):
        if not ins.opcode.startswith("BRA"):
            continue
        target = _SASS_TARGET.search(ins.operands)
        if target is None or labels.get(target.group(1)) is None:
            continue
        start = index_of[labels[target.group(1)]]
        if start < i:
            loops[start] = max(loops.get(start, i), i)
    return [Loop(start, end) for start, end in sorted(loops.items())]


def _width(opcode: str) -> int:
    parts = opcode.split(".")
    return max((_WIDTH_SUFFIX[p] for p in parts[1:] if p in _WIDTH_SUFFIX), default=32)


def memory_bits(instructions: list[Instruction]) -> tuple[list[int], list[int]]:
    """Widths of the global loads (``LDG``, ``LDGSTS`` async copies) and stores (``STG``)."""
    loads, stores = [], []
    for ins in instructions:
        head = ins.opcode.split(".")[0]
        if head in ("LDG", "LDGSTS"):
            loads.append(_width(ins.opcode))
        elif head == "STG":
            stores.append(_width(ins.opcode))
    return loads, stores


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_PTX_MEMORY = re.compile(r"\b(ld|st)\.global((?:\.\w+)*)")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.\w+\.shared\.global[^;]*,\s*(\d+)\s*(?:,[^;]*)?;")


def _ptx_bits(line: str) -> int:
    match = _PTX_CP_ASYNC.search(line)
    if match:
        return 8 * int(match.group(1))
    match = _PTX_MEMORY.search(line)
    if match is None:
        return 0
    parts = match.group(2).split(".")
    lanes = 4 if "v4" in parts else 2 if "v2" in parts else 1
    bits = [int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)]
    return lanes * (bits[-1] if bits else 32)


def ptx_hot_loop_bits(ptx: str) -> int | None:
    """Global memory bits one pass of the PTX's hot loop moves per thread."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        match = _PTX_LABEL.match(line)
        if match:
            labels[match.group(1)] = i
    loops: dict[int, int] = {}
    for i, line in enumerate(lines):
        match = _PTX_BRANCH.search(line)
        if match and labels.get(match.group(1), i) < i:
            start = labels[match.group(1)]
            loops[start] = max(loops.get(start, i), i)
    candidates = []
    for loop in innermost([Loop(s, e) for s, e in loops.items()]):
        body = lines[loop.start : loop.end + 1]
        loads = sum(_ptx_bits(line) for line in body if not re.search(r"\bst\.global", line))
        stores = sum(_ptx_bits(line) for line in body if re.search(r"\bst\.global", line))
        candidates.append((loads, stores, loads + stores))
    if not candidates:
        return None
    best = max(candidates)
    return best[2] or None


def mma_kind(instructions: list[Instruction], has_dot: bool) -> str:
    """``"wgmma"`` (Hopper warpgroup MMA), ``"mma"`` (warp MMA), ``"fma"`` (a ``tl.dot``
    lowered to FMAs) or ``"none"``."""
    heads = {ins.opcode.split(".")[0] for ins in instructions}
    if "HGMMA" in heads:
        return "wgmma"
    if heads & {"HMMA", "IMMA"}:
        return "mma"
    return "fma" if has_dot else "none"


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM, limited by registers, shared memory, warps and the CTA cap."""
    major_arch = 90 if arch >= 90 else 80
    if registers > MAX_REGISTERS_PER_THREAD:
        return 0
    unit = REGISTER_ALLOCATION_UNIT
    per_warp = -(-max(registers, 1) * 32 // unit) * unit
    warps_by_registers = REGISTERS_PER_SM // per_warp
    by_registers = warps_by_registers // num_warps
    by_warps = MAX_WARPS_PER_SM[major_arch] // num_warps
    by_shared = SHARED_PER_SM[major_arch] // (shared_bytes + SHARED_RESERVED_PER_CTA)
    return max(0, min(by_registers, by_warps, by_shared, MAX_CTAS_PER_SM))


def analyse(cubin: Path, ptx: str, has_dot: bool, shared_bytes: int, num_warps: int, arch: int):
    """The report's fields for one compiled kernel (see :mod:`saei_fast.tools.kernel_report`)."""
    sass = disassemble(cubin)
    usage = resource_usage(cubin)
    instructions, labels = parse_sass(sass)
    loads, stores = memory_bits(instructions)
    # ptxas counts the bytes of its spill stores; local-memory stores are nothing else in
    # Triton code (it never builds stack arrays).
    spill_bytes = sum(
        _width(ins.opcode) // 8 for ins in instructions if ins.opcode.split(".")[0] == "STL"
    )
    hot = pick_hot(
        [
            (loop, *memory_bits(instructions[loop.start : loop.end + 1]))
            for loop in innermost(sass_loops(instructions, labels))
        ]
    )
    loop_fields = {"loop_instructions": None, "unroll": None, "barriers_in_loop": 0}
    if hot is not None:
        body = instructions[hot.start : hot.end + 1]
        body_loads, body_stores = memory_bits(body)
        loads, stores = body_loads or loads, body_stores or stores
        ptx_bits = ptx_hot_loop_bits(ptx)
        moved = sum(body_loads) + sum(body_stores)
        loop_fields = {
            "loop_instructions": len(body),
            "unroll": max(1, round(moved / ptx_bits)) if ptx_bits and moved else 1,
            "barriers_in_loop": sum(ins.opcode.split(".")[0] == "BAR" for ins in body),
        }
    regs = usage["REG"]
    return sass, {
        "registers": regs,
        "spill_bytes": spill_bytes,
        "local_bytes": usage["LOCAL"],
        "shared_bytes": shared_bytes,
        "ctas_per_sm": occupancy(regs, shared_bytes, num_warps, arch),
        "load_bits": max(loads, default=0),
        "store_bits": max(stores, default=0),
        "mma": mma_kind(instructions, has_dot),
        "tma": any(ins.opcode.startswith("UTMALDG") for ins in instructions),
        **loop_fields,
    }
