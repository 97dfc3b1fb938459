"""Writing the sweep's results: markdown tables, raw JSON, and a speedup plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

Record = dict[str, Any]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.3f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def _mib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2 ** 20:.2f}"


def _speedup(entry: Record) -> str:
    if entry.get("status") != "ok":
        return "n/a"
    return f"{entry['speedup']:.2f}× [{entry['speedup_q1']:.2f}–{entry['speedup_q3']:.2f}]"


def header_lines(meta: Record) -> list[str]:
    """The lines above the tables: machine, torch, device, matmul peak, date."""
    return [
        f"- machine: {meta['cpu_count']} CPU cores ({meta['platform']}); "
        f"{'; '.join(meta['device_notes'])}",
        f"- torch {meta['torch']}, device `{meta['device']}`",
        f"- measured fp32 matmul peak: {meta['matmul_peak_gflops']:.1f} GFLOP/s "
        f"(`torch.mm` {meta['matmul_n']}×{meta['matmul_n']}, median)",
        f"- date: {meta['date']}",
        f"- timing: {meta['rounds']} interleaved rounds per candidate, ~{meta['round_ms']:.0f} ms "
        "each, `torch.utils.benchmark.Timer`, `torch.inference_mode()`",
    ]


def summary_table(records: list[Record], names: list[str]) -> str:
    """One row per shape: loop time and every candidate's speedup over the loop."""
    others = [n for n in names if n != "loop"]
    rows = []
    for rec in records:
        cands = rec["candidates"]
        loop = cands.get("loop", {})
        fx = cands.get("fxfuse", {})
        rows.append([rec["label"], rec["name"], _ms(loop.get("median_s")),
                     *[_speedup(cands.get(n, {})) for n in others], fx.get("chosen") or ""])
    return tabulate(rows, headers=["shape", "B C H W k C_out", "loop ms",
                                   *[f"{n} speedup" for n in others], "fxfuse chose"],
                    tablefmt="github", disable_numparse=True)


def detail_table(records: list[Record], names: list[str]) -> str:
    """One row per shape and candidate: time, spread, speedup, throughput, memory, notes."""
    rows = []
    for rec in records:
        for name in names:
            e = rec["candidates"].get(name, {"status": "n/a", "note": "not run"})
            if e["status"] != "ok":
                rows.append([rec["name"], name, "n/a", "", "", "", "", "", e.get("note", "")])
                continue
            iqr = e["q3_s"] - e["q1_s"]
            note = e.get("note", "")
            if not e.get("numerics_ok", True):
                note = f"MISMATCH max|Δ|={e['max_abs_err']:.2e}; {note}"
            rows.append([rec["name"], name, _ms(e["median_s"]), _ms(iqr), _speedup(e),
                         f"{e['gflops']:.2f}", f"{e['pct_peak']:.1f}",
                         _mib(e.get("peak_mem_bytes")), note])
    return tabulate(rows, headers=["B C H W k C_out", "candidate", "median ms", "IQR ms",
                                   "speedup [q1–q3]", "GFLOP/s", "% peak", "peak MiB", "notes"],
                    tablefmt="github", disable_numparse=True)


def write_markdown(path: Path, meta: Record, records: list[Record], names: list[str]) -> None:
    """Write ``bench.md``: header, summary table, detail table, reading notes."""
    text = "\n".join([
        "# Row-loop Conv1d benchmark", "", *header_lines(meta), "",
        "## Speedup over the loop", "",
        "Median of per-round ratios t_loop / t_candidate; brackets: their q1–q3.", "",
        summary_table(records, names), "",
        "## Details", "",
        "GFLOP/s from 2·B·H·C_out·W_out·C·k; % peak relative to the matmul peak above; "
        "peak MiB: bytes torch allocated during one call above what was live before "
        "(activations, workspaces, output; not weights or input).", "",
        detail_table(records, names), "",
    ])
    path.write_text(text)


def write_json(path: Path, meta: Record, records: list[Record], extra: Record | None = None) -> None:
    """Write the raw numbers (every round of every candidate) as JSON."""
    data = {"meta": meta, "shapes": records, **(extra or {})}
    path.write_text(json.dumps(data, indent=1, default=str))


def plot_speedups(path: Path, records: list[Record], names: list[str]) -> None:
    """Speedup over the loop per shape per candidate, log-scale y, q1–q3 error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    others = [n for n in names if n != "loop"]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(records) + 3), 5.5))
    for i, name in enumerate(others):
        xs, ys, lo, hi = [], [], [], []
        for j, rec in enumerate(records):
            e = rec["candidates"].get(name, {})
            if e.get("status") == "ok" and e["speedup"] > 0:
                xs.append(j + (i - (len(others) - 1) / 2) * 0.12)
                ys.append(e["speedup"])
                lo.append(max(e["speedup"] - e["speedup_q1"], 0.0))
                hi.append(max(e["speedup_q3"] - e["speedup"], 0.0))
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=5, capsize=2, label=name)
        else:
            ax.plot([], [], " ", label=f"{name}: n/a")
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([r["name"] for r in records], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over loop (×, log)")
    ax.set_title("Per-row Conv1d loop: speedup of each candidate")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finite_or_none(value: float) -> float | None:
    """JSON-friendly float: None for inf/nan."""
    return value if math.isfinite(value) else None
