"""The pass's own cost: seconds ``fxfuse.fuse`` spends on models with many rows or sites.

Usage::

    python benchmarks/pass_time.py [--quick] [--out DIR]

Two families, both cheap to run so that the pass dominates (CPU, B=2, C=2, W=8, k=3):
one loop site with H rows, and N chained loop sites of H=4 rows each. ``--default``
times the default path instead (``fxfuse.fuse(model, (x,))``: auto's timing,
verification and the benchmark included) on 4096 rows of ``Conv1d(1, 1, 1)``, 256 rows
of Linear -> GELU -> LayerNorm and the seed model (the demo's fuse step). When the
package exposes ``trace_model``, ``find_row_sites`` and ``apply_sites``, the time is
also split into trace / find / rewrite. Appends a table to ``bench.md`` and writes
``pass_time.json`` and ``pass_time.png`` (also adds ``pass_time`` to ``bench.json``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402

from models import ChainedRowConvLoops, RowConvLoop  # noqa: E402

ROWS = (64, 128, 256, 512, 1024)
SITES = (5, 10, 25, 50)
B, C, W = 2, 2, 8
SECTION = "## Pass time"


def _fxfuse() -> Any | None:
    try:
        import fxfuse
    except ImportError:
        return None
    return fxfuse


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (garbage collected before each)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _split(fx: Any, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """One trace / find / rewrite-all-fusable-sites pass, timed per phase."""
    model = copy.deepcopy(model)  # the traced graph shares submodules; rewrite mutates
    start = time.perf_counter()
    gm = fx.trace_model(model, (x,))
    traced = time.perf_counter()
    sites = list(fx.find_row_sites(gm))
    found = time.perf_counter()
    fx.apply_sites(gm, sites, "grouped")     # every site, then one recompile
    done = time.perf_counter()
    return {"trace_s": traced - start, "find_s": found - traced, "rewrite_s": done - found,
            "sites_found": len(sites)}


def time_config(family: str, size: int, repeats: int) -> dict[str, Any]:
    """Time the pass on one model of ``family`` ("rows" or "sites") and ``size``."""
    if family == "rows":
        model, x = RowConvLoop(C, size, C, 3), torch.randn(B, C, size, W)
    else:
        model, x = ChainedRowConvLoops(size, C, 4), torch.randn(B, C, 4, W)
    row: dict[str, Any] = {"family": family, "size": size,
                           "convs": size if family == "rows" else 4 * size}
    fx = _fxfuse()
    if fx is None or not hasattr(fx, "fuse"):
        return {**row, "status": "n/a", "note": "fxfuse.fuse not available"}
    try:
        fresh = iter([copy.deepcopy(model) for _ in range(repeats)])  # in case fuse mutates
        row["total_s"] = _median_time(lambda: fx.fuse(
            next(fresh), (x,), verify=False, benchmark=False, lowering="grouped"), repeats)
    except Exception as exc:  # noqa: BLE001 - report and go on
        return {**row, "status": "n/a", "note": f"fuse failed: {type(exc).__name__}: {exc}"[:200]}
    row["status"] = "ok"
    if all(hasattr(fx, n) for n in ("trace_model", "find_row_sites", "apply_sites")):
        try:
            row.update(_split(fx, model, x))
        except Exception as exc:  # noqa: BLE001
            row["note"] = f"split failed: {type(exc).__name__}: {exc}"[:200]
    return row


class LinearGeluNormRows(nn.Module):
    """One Linear -> GELU -> LayerNorm per row of a (B, H, F) input, stacked on dim 1."""

    def __init__(self, rows: int, features: int = 8) -> None:
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(nn.Linear(features, features), nn.GELU(),
                                                nn.LayerNorm(features)) for _ in range(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row(x[:, h]) for h, row in enumerate(self.rows)], 1)


def default_path_models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    """The models of ``--default``: (label, model, input)."""
    from fxfuse.examples import RowConv1d
    torch.manual_seed(0)
    return [("4096 rows Conv1d(1,1,1)", RowConvLoop(1, 4096, 1, 1).eval(),
             torch.randn(2, 1, 4096, 8)),
            ("256 rows Linear-GELU-LayerNorm", LinearGeluNormRows(256).eval(),
             torch.randn(2, 256, 8)),
            ("seed (demo fuse step)", RowConv1d().eval(), torch.randn(32, 15, 10, 100))]


def time_default_path() -> list[dict[str, Any]]:
    """Seconds of ``fxfuse.fuse(model, (x,))`` (default options) per model, once each."""
    import fxfuse
    results = []
    for label, model, x in default_path_models():
        start = time.perf_counter()
        result = fxfuse.fuse(model, (x,))
        seconds = time.perf_counter() - start
        picks = ", ".join(s.lowering or "-" for s in result.sites)
        results.append({"model": label, "total_s": seconds, "lowerings": picks,
                        "threads": torch.get_num_threads()})
        print(f"default path {label:<32} {seconds:7.2f} s  ({picks})", flush=True)
    return results


def _warm_up() -> None:
    """One untimed pass on a tiny model, so imports and first-call costs are not timed."""
    fx = _fxfuse()
    if fx is not None and hasattr(fx, "fuse"):
        try:
            fx.fuse(RowConvLoop(C, 2, C, 3), (torch.randn(B, C, 2, W),), verify=False,
                    benchmark=False, lowering="grouped")
        except Exception:  # noqa: BLE001 - the timed runs report the failure
            pass


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time every configuration; quick: fewer sizes, one repeat."""
    rows, sites = ((64, 256), (5, 10)) if quick else (ROWS, SITES)
    repeats = 1 if quick else 3
    _warm_up()
    results = []
    for family, sizes in (("rows", rows), ("sites", sites)):
        for size in sizes:
            results.append(time_config(family, size, repeats))
            r = results[-1]
            shown = f"{r['total_s']:.3f} s" if r["status"] == "ok" else f"n/a ({r['note']})"
            print(f"pass time {family}={size:<5} {shown}", flush=True)
    return results


def _sec(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table (github) of the configurations."""
    rows = [[("1 site × H=" if r["family"] == "rows" else "N sites × H=4, N=") + str(r["size"]),
             r["convs"], _sec(r.get("total_s")) or "n/a", _sec(r.get("trace_s")),
             _sec(r.get("find_s")), _sec(r.get("rewrite_s")), r.get("note", "")]
            for r in results]
    return tabulate(rows, headers=["model", "convs", "fuse s", "trace s", "find s",
                                   "rewrite s", "notes"], tablefmt="github", disable_numparse=True)


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """Seconds of ``fxfuse.fuse`` against the number of row convs, per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family, label in (("rows", "one site, H rows"), ("sites", "N sites × 4 rows")):
        pts = [(r["convs"], r["total_s"]) for r in results
               if r["family"] == family and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    if not any(r["status"] == "ok" for r in results):
        ax.text(0.5, 0.5, "fxfuse.fuse not available", ha="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("row convs in the model")
    ax.set_ylabel("fxfuse.fuse seconds (median)")
    ax.set_title("Cost of the pass itself (verify=False, lowering='grouped')")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, results: list[dict[str, Any]]) -> None:
    """Append (or replace) the table in bench.md; write pass_time.json/png; add to bench.json if present."""
    out.mkdir(parents=True, exist_ok=True)
    section = (f"\n{SECTION}\n\n`fxfuse.fuse(model, (x,), verify=False, benchmark=False, "
               f"lowering='grouped')` on CPU, B={B}, C={C}, W={W}, k=3; median seconds.\n\n"
               + table(results) + "\n")
    bench_md = out / "bench.md"
    before = bench_md.read_text() if bench_md.exists() else "# Row-loop Conv1d benchmark\n"
    bench_md.write_text(before.split(SECTION)[0].rstrip("\n") + "\n" + section)
    (out / "pass_time.json").write_text(json.dumps(results, indent=1))
    bench_json = out / "bench.json"
    if bench_json.exists():
        data = json.loads(bench_json.read_text())
        data["pass_time"] = results
        bench_json.write_text(json.dumps(data, indent=1))
    plot(out / "pass_time.png", results)


def run_and_report(out: Path, quick: bool = False) -> list[dict[str, Any]]:
    """Time the pass and write its reports under ``out``."""
    results = run(quick)
    write(out, results)
    print(f"wrote pass-time table to {out / 'bench.md'}, pass_time.png", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Time the fxfuse pass itself.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--default", action="store_true",
                        help="time the default path on the three models instead")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own)")
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if cli.default:
        _warm_up()
        found = time_default_path()
        cli.out.mkdir(parents=True, exist_ok=True)
        (cli.out / "pass_time_default.json").write_text(json.dumps(found, indent=1))
    else:
        run_and_report(cli.out, cli.quick)
