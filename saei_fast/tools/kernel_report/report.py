"""Report records (one per compiled kernel and benchmark shape) and their JSON / markdown."""

from __future__ import annotations

import json
from pathlib import Path

from saei_fast.kernels.plan import Target
from saei_fast.tools.kernel_report.roofline import estimate_us, wave_efficiency

LABEL = (
    "Compile-time estimates: registers, spills, load widths and instruction counts are read "
    "from the compiled binary; CTAs per SM, wave efficiency and times are models (roofline: "
    "max(bytes / peak bandwidth, FLOPs / peak FLOP/s)), not measurements."
)


def record(target: Target, plan: dict, compiled: dict) -> dict:
    """One report record: a plan's shape-dependent fields joined to its binary's fields."""
    threads = plan["num_warps"] * target.warp_size
    per_element = None
    if plan["loop_elements"] and compiled.get("loop_instructions"):
        # Elements one thread handles per source-level iteration of the hot loop; the
        # compiled loop body covers ``unroll`` of those iterations.
        per_thread = plan["loop_elements"] / threads
        per_element = compiled["loop_instructions"] / (compiled["unroll"] * per_thread)
    work_items = plan["extra"].get("work_items")
    estimate, bound = estimate_us(
        target, plan["bytes_moved"], plan["flops"], plan["dtype"], compiled["mma"]
    )
    row = {
        "op": plan["op"],
        "kernel": plan["kernel"],
        "role": plan["role"],
        "arch": target.name,
        "dtype": plan["dtype"],
        "shape": plan["shape"],
        "config": plan["config"],
        "registers": compiled["registers"],
        "spill_bytes": compiled["spill_bytes"],
        "shared_bytes": compiled["shared_bytes"],
        "ctas_per_sm": compiled["ctas_per_sm"],
        "load_bits": compiled["load_bits"],
        "store_bits": compiled["store_bits"],
        "mma": compiled["mma"],
        "sass_per_element": None if per_element is None else round(per_element, 2),
        "barriers_in_loop": compiled["barriers_in_loop"],
        "grid": plan["grid"],
        "wave_efficiency": round(
            wave_efficiency(plan["grid"], compiled["ctas_per_sm"], target.sm_count, work_items),
            4,
        ),
        "estimate_us": round(estimate, 2),
        "estimate_bound": bound,
        "cubin": compiled["files"]["cubin"],
        "sass": compiled["files"]["sass"],
        "loop_elements": plan["loop_elements"],
        "bytes_moved": plan["bytes_moved"],
        "flops": plan["flops"],
        "loop_instructions": compiled["loop_instructions"],
        "unroll": compiled["unroll"],
        "tma": compiled["tma"],
        "variant": plan["key"],
        "extra": plan["extra"],
    }
    if target.is_amd:
        row |= {k: compiled[k] for k in ("vgprs", "agprs", "sgprs", "occupancy")}
        row |= {k: compiled["files"][k] for k in ("hsaco", "amdgcn")}
    else:
        row["ptx"] = compiled["files"]["ptx"]
    return row


def write_json(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")


def _shape(shape: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in shape.items())


def _config(config: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in config.items())


def _registers(r: dict, target: Target) -> str:
    return f"{r['vgprs']}/{r['sgprs']}" if target.is_amd else str(r["registers"])


def _per_element(r: dict) -> str:
    return "-" if r["sass_per_element"] is None else f"{r['sass_per_element']:.1f}"


def summary(records: list[dict], target: Target) -> list[str]:
    """One row per compiled variant: what the binary shows, and the worst wave efficiency
    over the shapes that launch it."""
    units = "CU" if target.is_amd else "SM"
    regs = "VGPR/SGPR" if target.is_amd else "regs"
    lines = [
        f"| op | kernel | role | dtype | config | {regs} | spill B | smem B | CTAs/{units} | "
        "ld/st bits | mma | instr/elem | bar in loop | shapes | min wave eff |",
        "|" + "---|" * 15,
    ]
    variants: dict[str, list[dict]] = {}
    for r in records:
        variants.setdefault(r["variant"], []).append(r)
    for group in variants.values():
        r = group[0]
        lines.append(
            f"| {r['op']} | {r['kernel']} | {r['role']} | {r['dtype']} | {_config(r['config'])} | "
            f"{_registers(r, target)} | {r['spill_bytes']} | {r['shared_bytes']} | "
            f"{r['ctas_per_sm']} | {r['load_bits']}/{r['store_bits']} | {r['mma']} | "
            f"{_per_element(r)} | {r['barriers_in_loop']} | {len(group)} | "
            f"{min(x['wave_efficiency'] for x in group):.2f} |"
        )
    return lines


def gemm_counts(records: list[dict]) -> list[str]:
    """One row per (path, tokens, D) of the linear paths whose plans state their GEMM count
    (units of ``2 N D V`` FLOPs, recomputed rows included): how many matmuls of the lm_head a
    token costs on each path, whatever the chunking."""
    cases = {}
    for r in records:
        extra = r["extra"]
        if {"path", "gemms", "tokens"} <= extra.keys():
            key = (extra["path"], extra["tokens"], r["shape"]["D"])
            cases[key] = (extra["gemms"], extra.get("chunks", "-"))
    lines = ["| path | tokens N | D | GEMMs per token | chunks |", "|---|---|---|---|---|"]
    for (path, tokens, d), (gemms, chunks) in sorted(cases.items()):
        lines.append(f"| {path} | {tokens} | {d} | {gemms:.2f} | {chunks} |")
    return lines if len(lines) > 2 else []


def markdown(records: list[dict], target: Target, problems: list[str]) -> str:
    """The report as markdown, labelled as estimates: one row per compiled variant, then one
    row per record (variant x benchmark shape)."""
    units = "CU" if target.is_amd else "SM"
    regs = "VGPR/SGPR" if target.is_amd else "regs"
    lines = [
        f"## Kernel report: {target.name} ({target.sm_count} {units}s, "
        f"{target.hbm_bytes_per_s / 1e12:.2f} TB/s, {target.dense_flops / 1e12:.0f} TFLOP/s "
        "bf16)",
        "",
        LABEL,
        "",
        "### Compiled variants",
        "",
        *summary(records, target),
        "",
        "### Every benchmark shape",
        "",
        f"| op | kernel | role | dtype | shape | config | {regs} | spill B | smem B | "
        f"CTAs/{units} | ld/st bits | mma | instr/elem | bar | grid | wave eff | est. us |",
        "|" + "---|" * 17,
    ]
    gemms = gemm_counts(records)
    if gemms:
        at = lines.index("### Every benchmark shape")
        lines[at:at] = ["### lm_head GEMMs per token, by path", "", *gemms, ""]
    for r in records:
        lines.append(
            f"| {r['op']} | {r['kernel']} | {r['role']} | {r['dtype']} | {_shape(r['shape'])} | "
            f"{_config(r['config'])} | {_registers(r, target)} | {r['spill_bytes']} | "
            f"{r['shared_bytes']} | {r['ctas_per_sm']} | {r['load_bits']}/{r['store_bits']} | "
            f"{r['mma']} | {_per_element(r)} | {r['barriers_in_loop']} | "
            f"{'x'.join(map(str, r['grid']))} | {r['wave_efficiency']:.2f} | "
            f"{r['estimate_us']:.1f} |"
        )
    if problems:
        lines += ["", "Not reported:", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"
