"""Read an AMD kernel binary's assembly: VGPRs/SGPRs, scratch, LDS, occupancy, load widths,
MFMA use and the hot loop's size.

Triton's AMD backend emits ``amdgcn`` assembly whose comments carry the register, scratch and
occupancy figures the assembler computed ("; NumVgprs: 13", "; Occupancy: 8"). Loops are read
from the branches, as on NVIDIA: a scalar branch (``s_branch`` / ``s_cbranch_*``) back to an
earlier label closes a loop when the label's code can reach that branch again. LLVM's loop
comments are not relied on: their placement (on the label's line or the next one) varies with
the code generator's version and with debug line info.
"""

from __future__ import annotations

import re

from saei_fast.tools.kernel_report.loops import Loop, innermost, pick_hot

# CDNA2/CDNA3 compute units: 4 SIMDs, 64 KiB of LDS per CU.
SIMDS_PER_CU = 4
LDS_PER_CU = 65536

_INFO = re.compile(r"^;\s*(\w+):\s*(\d+)", re.MULTILINE)
_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_TARGET = re.compile(r"(\.LBB\d+_\d+)")
_INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9_]*)\b")
_WIDTHS = {
    "ubyte": 8,
    "sbyte": 8,
    "byte": 8,
    "ushort": 16,
    "sshort": 16,
    "short": 16,
    "dword": 32,
    "dwordx2": 64,
    "dwordx3": 96,
    "dwordx4": 128,
    "b8": 8,
    "b16": 16,
    "b32": 32,
    "b64": 64,
    "b96": 96,
    "b128": 128,
}
# Vector memory instructions that read or write global memory (buffer ops are what Triton
# emits for tensors it proves to be under 2 GiB; flat ops may address global memory too).
_LOAD_PREFIXES = ("global_load_", "buffer_load_", "flat_load_")
_STORE_PREFIXES = ("global_store_", "buffer_store_", "flat_store_")


def kernel_info(asm: str) -> dict[str, int]:
    """The assembler's "; Name: value" summary (NumVgprs, TotalNumSgprs, ScratchSize, ...)."""
    return {name: int(value) for name, value in _INFO.findall(asm)}


def _width(mnemonic: str, prefixes: tuple[str, ...]) -> int | None:
    for prefix in prefixes:
        if mnemonic.startswith(prefix):
            kind = mnemonic[len(prefix) :].removesuffix("_d16").removesuffix("_d16_hi")
            return _WIDTHS.get(kind)
    return None


def memory_bits(mnemonics: list[str]) -> tuple[list[int], list[int]]:
    """Widths of the global vector loads and stores among ``mnemonics``."""
    loads = [w for m in mnemonics if (w := _width(m, _LOAD_PREFIXES)) is not None]
    stores = [w for m in mnemonics if (w := _width(m, _STORE_PREFIXES)) is not None]
    return loads, stores


def _successors(mnemonic: str, index: int, target: int | None) -> list[int]:
    """Where control may go after instruction ``index``: the next instruction, a branch's
    target, or nowhere (``s_endpgm``)."""
    if mnemonic == "s_endpgm":
        return []
    if mnemonic == "s_branch":
        return [] if target is None else [target]
    if mnemonic.startswith("s_cbranch_") and target is not None:
        return [index + 1, target]
    return [index + 1]


def parse(asm: str) -> tuple[list[str], list[Loop]]:
    """The kernel's instruction mnemonics in order, and its loops as index ranges.

    A loop runs from a label to a later branch back to it, provided the label's code can
    reach that branch (a branch back to the exit block, ``s_endpgm``, is no loop). The range
    is taken as the body: LLVM lays a simple loop's blocks out contiguously (the entropy
    loops are one block each); a loop with rarely taken blocks placed elsewhere is counted
    without them, as on NVIDIA."""
    mnemonics: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    in_text = False
    for line in asm.splitlines():
        if line.startswith(".Lfunc_end"):
            break
        if re.match(r"^[A-Za-z_]\w*:", line):  # the kernel's own label
            in_text = True
            continue
        if not in_text:
            continue
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(mnemonics)
            continue
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        mnemonic = match.group(1)
        if mnemonic == "s_branch" or mnemonic.startswith("s_cbranch_"):
            target = _TARGET.search(line)
            if target:
                branches.append((len(mnemonics), target.group(1)))
        mnemonics.append(mnemonic)
    targets = {i: labels.get(name) for i, name in branches}
    successors = [_successors(m, i, targets.get(i)) for i, m in enumerate(mnemonics)]

    def reaches(start: int, goal: int) -> bool:
        seen, stack = {start}, [start]
        while stack:
            i = stack.pop()
            if i == goal:
                return True
            for j in successors[i]:
                if j < len(mnemonics) and j not in seen:
                    seen.add(j)
                    stack.append(j)
        return False

    loops: dict[int, int] = {}
    for i, start in targets.items():
        if start is not None and start <= i and reaches(start, i):
            loops[start] = max(loops.get(start, i), i)
    return mnemonics, [Loop(start, end) for start, end in sorted(loops.items())]


_LL_LABEL = re.compile(r"^([\w.$-]+):")
_LL_TARGET = re.compile(r"label %([\w.$-]+)")
_LL_LOAD = re.compile(r"= load (?:<(\d+) x )?(\w+)>?, ptr addrspace\(1\)")
_LL_STORE = re.compile(r"\bstore (?:<(\d+) x )?(\w+)>? [^,]+, ptr addrspace\(1\)")
_LL_BUFFER = re.compile(r"@llvm\.amdgcn\.raw\.ptr\.buffer\.(load|store)\.(?:v(\d+))?([a-z]+\d+)")
_LL_BITS = {"i8": 8, "i16": 16, "half": 16, "bfloat": 16, "i32": 32, "float": 32, "f16": 16}
_LL_BITS |= {"bf16": 16, "f32": 32, "i64": 64, "double": 64, "f64": 64}


def _ll_bits(line: str) -> tuple[int, int]:
    """(load bits, store bits) of one LLVM IR line's global memory access."""
    for pattern, kind in ((_LL_LOAD, "load"), (_LL_STORE, "store")):
        match = pattern.search(line)
        if match:
            bits = int(match.group(1) or 1) * _LL_BITS.get(match.group(2), 32)
            return (bits, 0) if kind == "load" else (0, bits)
    match = _LL_BUFFER.search(line)
    if match:
        bits = int(match.group(2) or 1) * _LL_BITS.get(match.group(3), 32)
        return (bits, 0) if match.group(1) == "load" else (0, bits)
    return 0, 0


def llir_hot_loop_bits(llir: str) -> int | None:
    """Global memory bits one pass of the LLVM IR's hot loop moves per thread: the reference
    for the unroll factor of the assembly's loop (the AMDGPU code generator may unroll)."""
    lines = llir.splitlines()
    labels: dict[str, int] = {}
    for i, line in enumerate(lines):
        match = _LL_LABEL.match(line)
        if match:
            labels[match.group(1)] = i
    loops: dict[int, int] = {}
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("br "):
            continue
        for name in _LL_TARGET.findall(line):
            if labels.get(name, i) < i:
                loops[labels[name]] = max(loops.get(labels[name], i), i)
    candidates = []
    for loop in innermost([Loop(s, e) for s, e in loops.items()]):
        bits = [_ll_bits(line) for line in lines[loop.start : loop.end + 1]]
        loads, stores = sum(b[0] for b in bits), sum(b[1] for b in bits)
        candidates.append((loads, stores, loads + stores))
    return max(candidates)[2] or None if candidates else None


def occupancy(waves_per_simd: int, lds_bytes: int, num_warps: int) -> int:
    """Resident workgroups per CU: its waves spread over the 4 SIMDs, each holding at most
    ``waves_per_simd`` (the assembler's figure, set by VGPRs/SGPRs), and the CU's LDS."""
    by_waves = SIMDS_PER_CU * waves_per_simd // num_warps
    by_lds = LDS_PER_CU // lds_bytes if lds_bytes else by_waves
    return max(0, min(by_waves, by_lds))


def analyse(asm: str, llir: str, has_dot: bool, lds_bytes: int, num_warps: int) -> dict:
    """The report's fields for one compiled kernel, with their AMD meanings."""
    info = kernel_info(asm)
    mnemonics, loops = parse(asm)
    loads, stores = memory_bits(mnemonics)
    hot = pick_hot(
        [(loop, *memory_bits(mnemonics[loop.start : loop.end + 1])) for loop in innermost(loops)]
    )
    loop_fields = {"loop_instructions": None, "unroll": None, "barriers_in_loop": 0}
    if hot is not None:
        body = mnemonics[hot.start : hot.end + 1]
        body_loads, body_stores = memory_bits(body)
        loads, stores = body_loads or loads, body_stores or stores
        reference = llir_hot_loop_bits(llir)
        moved = sum(body_loads) + sum(body_stores)
        loop_fields = {
            "loop_instructions": len(body),
            "unroll": max(1, round(moved / reference)) if reference and moved else 1,
            "barriers_in_loop": sum(m == "s_barrier" for m in body),
        }
    fallback = "fma" if has_dot else "none"  # a tl.dot without MFMA runs on the vector ALUs
    waves = info.get("Occupancy", 0)
    vgprs = info.get("TotalNumVgprs", info.get("NumVgprs", 0))
    return {
        "registers": vgprs,
        "vgprs": vgprs,
        "agprs": info.get("NumAgprs", 0),
        "sgprs": info.get("TotalNumSgprs", 0),
        "spill_bytes": info.get("ScratchSize", 0),
        "shared_bytes": lds_bytes,
        "occupancy": waves,
        "ctas_per_sm": occupancy(waves, lds_bytes, num_warps),
        "load_bits": max(loads, default=0),
        "store_bits": max(stores, default=0),
        "mma": "mfma" if any(m.startswith("v_mfma") for m in mnemonics) else fallback,
        "tma": False,
        **loop_fields,
    }
