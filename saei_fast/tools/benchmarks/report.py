"""Tables, CSV and JSON of benchmark rows (see ``runner.run_cases``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    "op", "provider", "kind", "note", "mode", "shape", "dtype", "status", "reason",
    "median_ms", "min_ms", "max_ms", "spread_pct", "repeats", "bytes_moved", "GB/s", "flops",
    "TFLOP/s", "executed_TFLOP/s", "pct_of_peak", "peak_memory_MiB", "x_ours", "noisy",
    "host_syncs",
    "valid_tokens", "completion_tokens",
]  # fmt: skip


def _fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _ratio(row: dict) -> str:
    """ "x ours", marked when the two min-max ranges overlap (the order is not settled)."""
    text = _fmt(row.get("x_ours"))
    return f"{text} (noisy)" if row.get("noisy") else text


def op_table(rows: list[dict], title: str) -> str:
    """One markdown table for one op: timed rows first, then skipped / failed ones with why."""
    ok = [r for r in rows if r.get("status") == "ok"]
    rate = "TFLOP/s" if any("TFLOP/s" in r for r in ok) else "GB/s"
    lines = [
        f"### {title}",
        "",
        f"| provider | note | mode | shape | median ms | min-max ms | {rate} | % of peak "
        "| peak MiB | x ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        lines.append(
            f"| {r['provider']} | {r['note']} | {r['mode']} | {r['shape']} "
            f"| {_fmt(r['median_ms'], 4)} | {_fmt(r['min_ms'])}-{_fmt(r['max_ms'])} "
            f"| {_fmt(r.get(rate))} | {_fmt(r.get('pct_of_peak'))} "
            f"| {_fmt(r.get('peak_memory_MiB'))} | {_ratio(r)} |"
        )
    others = {}
    for r in rows:
        if r.get("status") != "ok":
            others.setdefault((r["provider"], r["status"], r["reason"]), []).append(r["mode"])
    if others:
        lines.append("")
        for (provider, status, reason), modes in others.items():
            lines.append(f"- {provider} ({', '.join(dict.fromkeys(modes))}): {status}: {reason}")
    return "\n".join(lines) + "\n"


def tables(rows: list[dict], info: dict, peaks: dict | None) -> str:
    """The header (device, versions, peaks) and one table per op, in the rows' order."""
    from saei_fast.tools.benchmarks.registry import OPS

    head = [
        f"device {info['device']}, {info['date']}, torch {info['torch']}, "
        f"triton {info['triton']}, saei-fast {info['saei_fast']}"
        + (f", {info['threads']} threads" if "threads" in info else "")
        + (
            f", {info['busy_processes']} busy processes started"
            if info.get("busy_processes")
            else ""
        )
    ]
    if peaks:
        head.append(
            f"peaks: copy {peaks['copy_GBps']} GB/s, {peaks['matmul_dtype']} matmul "
            f"{peaks['matmul_TFLOPs']} TFLOP/s ({peaks['source']}); "
            "% of peak is against these"
        )
    head.append(
        "x ours: median time / ours' median time in the same run (> 1: slower than ours); "
        "providers timed in interleaved rounds after warm-up; (noisy): the two min-max "
        "ranges overlap, so this run does not settle which is faster"
    )
    parts = ["\n".join(head) + "\n"]
    for op in dict.fromkeys(r["op"] for r in rows):
        parts.append(op_table([r for r in rows if r["op"] == op], OPS[op].title))
    return "\n".join(parts)


def write_outputs(out_dir: str | Path, rows: list[dict], info: dict, peaks: dict | None) -> dict:
    """Write ``bench.csv``, ``bench.json`` and ``bench.md`` under ``out_dir``; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "bench.csv", "json": out / "bench.json", "md": out / "bench.md"}
    info_columns = list(info)
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + info_columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **info})
    paths["json"].write_text(json.dumps({"info": info, "peaks": peaks, "rows": rows}, indent=1))
    paths["md"].write_text(tables(rows, info, peaks))
    return paths
