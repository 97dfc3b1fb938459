"""Benchmark sweep: the per-row Conv1d loop against its rewrites, side by side.

Usage::

    python benchmarks/run.py                  # full sweep (about 25 shapes) + pass time
    python benchmarks/run.py --quick          # 3-shape smoke run
    python benchmarks/run.py --shapes seed,H256 --no-compile --out /tmp/bench

Candidates per shape, timed in one process, interleaved: ``loop`` (the model as
written), ``hand_grouped`` (the manual grouped conv), ``compile`` (``torch.compile``
of the loop), ``vmap`` (``torch.vmap`` over stacked row weights) and ``fxfuse`` (the
pass's output). Writes ``bench.md``, ``bench.json`` and ``bench.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import report  # noqa: E402
from candidates import CANDIDATES, build_candidates, max_abs_error  # noqa: E402
from models import RowConvLoop, self_check  # noqa: E402
from fxfuse.check.verify import permitted_error  # noqa: E402
from fxfuse.check.precision import matmul_precision  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One benchmark case: input (B, C, H, W), kernel k, C_out output channels per row."""

    label: str
    B: int
    C: int
    H: int
    W: int
    k: int
    C_out: int

    @property
    def name(self) -> str:
        """E.g. ``B32 C15 H10 W100 k3 Co15``."""
        return f"B{self.B} C{self.C} H{self.H} W{self.W} k{self.k} Co{self.C_out}"


SHAPES: tuple[Shape, ...] = (
    Shape("seed", 32, 15, 10, 100, 3, 15),
    Shape("wide-C", 32, 64, 16, 256, 5, 64),
    Shape("long-W k7", 64, 8, 32, 512, 7, 8),
    Shape("H2", 32, 15, 2, 100, 3, 15),
    Shape("H4", 32, 15, 4, 100, 3, 15),
    Shape("H64", 32, 15, 64, 100, 3, 15),
    Shape("H128 C4", 32, 4, 128, 64, 3, 4),
    Shape("H256", 8, 15, 256, 100, 3, 15),
    Shape("H256 tiny", 2, 8, 256, 32, 3, 8),
    Shape("W4", 32, 15, 10, 4, 3, 15),
    Shape("W1 k1", 32, 15, 10, 1, 1, 15),
    Shape("W8192", 4, 15, 10, 8192, 3, 15),
    Shape("W4096 k5", 8, 32, 8, 4096, 5, 32),
    Shape("Cout>C", 32, 15, 10, 100, 3, 64),
    Shape("Cout<C", 32, 64, 10, 100, 3, 8),
    Shape("C3->32", 32, 3, 16, 128, 3, 32),
    Shape("B1", 1, 15, 10, 100, 3, 15),
    Shape("B256", 256, 15, 10, 100, 3, 15),
    Shape("C128", 16, 128, 8, 128, 3, 128),
    Shape("C256 k1", 16, 256, 4, 64, 1, 256),
    Shape("k9", 32, 16, 32, 256, 9, 16),
    Shape("C1", 64, 1, 64, 256, 3, 1),
    Shape("H128 Co48", 16, 32, 128, 16, 3, 48),
    Shape("even k4", 32, 15, 10, 101, 4, 15),
)
QUICK = ("seed", "wide-C", "long-W k7")
NUMERICS_RTOL = 1e-4  # fp32: differently ordered sums differ by ~1e-6 of the output's scale


def select_shapes(pattern: str | None, quick: bool) -> list[Shape]:
    """Shapes matching ``--shapes`` (comma-separated indices or label/name substrings)."""
    shapes = [s for s in SHAPES if s.label in QUICK] if quick else list(SHAPES)
    if not pattern:
        return shapes
    tokens = [t.strip().lower() for t in pattern.split(",") if t.strip()]
    picked = [s for i, s in enumerate(SHAPES) if any(
        t == str(i) or t in s.label.lower() or t in s.name.lower() for t in tokens)]
    if not picked:
        raise SystemExit(f"--shapes {pattern!r} matches none of: "
                         + ", ".join(f"{i}:{s.label}" for i, s in enumerate(SHAPES)))
    return [s for s in picked if s in shapes] or picked


def _entry(cand: Any, timing: harness.Timing, loop_timing: harness.Timing, flops: int,
           peak_gflops: float, err: float, tol: float, mem: int | None) -> dict[str, Any]:
    """The JSON record of one timed candidate."""
    speedup, s_q1, s_q3 = harness.paired_speedup(loop_timing, timing)
    q1, q3 = timing.quartiles
    gflops = flops / timing.median / 1e9
    return {"status": "ok", "median_s": timing.median, "q1_s": q1, "q3_s": q3,
            "rounds_s": timing.rounds_s, "number": timing.number,
            "speedup": speedup, "speedup_q1": s_q1, "speedup_q3": s_q3,
            "gflops": gflops, "pct_peak": 100 * gflops / peak_gflops,
            "peak_mem_bytes": mem, "max_abs_err": report.finite_or_none(err),
            "numerics_ok": err <= tol, "note": cand.note, "chosen": cand.chosen,
            "setup_s": cand.setup_s}


def measure_shape(shape: Shape, args: argparse.Namespace, peak_gflops: float) -> dict[str, Any]:
    """Build every candidate for ``shape``, check numerics, time, measure memory."""
    torch.manual_seed(0)
    loop = RowConvLoop(shape.C, shape.H, shape.C_out, shape.k).to(args.device)
    x = torch.randn(shape.B, shape.C, shape.H, shape.W, device=args.device)
    cands = build_candidates(loop, x, compile_=not args.no_compile,
                             compile_timeout_s=args.compile_timeout, lowering=args.lowering)
    with torch.inference_mode():
        want = loop(x)
    flops = harness.conv_flops(shape.B, shape.C, shape.H, want.shape[-1], shape.k, shape.C_out)
    ready = {c.name: c for c in cands if c.fn is not None}
    errors = {n: max_abs_error(c.fn, x, want) for n, c in ready.items()}
    # Under TF32 (cuDNN's default on CUDA) the bound is what the mode permits the loop.
    tol = max(NUMERICS_RTOL * max(1.0, want.abs().max().item()), permitted_error(loop, (x,)))
    timings = harness.time_interleaved({n: c.fn for n, c in ready.items()}, x, rounds=args.rounds,
                                       target_round_s=args.round_ms / 1e3)
    record: dict[str, Any] = {**asdict(shape), "name": shape.name, "W_out": want.shape[-1],
                              "flops": flops, "candidates": {}}
    for cand in cands:
        if cand.fn is None:
            record["candidates"][cand.name] = {"status": "n/a", "note": cand.note}
            continue
        mem = harness.peak_memory_bytes(cand.fn, x)
        record["candidates"][cand.name] = _entry(cand, timings[cand.name], timings["loop"],
                                                 flops, peak_gflops, errors[cand.name], tol, mem)
    del cands, ready, loop, x, want
    torch._dynamo.reset()
    gc.collect()
    return record


def _progress(i: int, n: int, record: dict[str, Any]) -> str:
    parts = []
    for name, e in record["candidates"].items():
        if name == "loop":
            parts.append(f"loop {e['median_s'] * 1e3:.3f} ms")
        elif e["status"] == "ok":
            bad = "" if e["numerics_ok"] else " MISMATCH"
            chosen = f" ({e['chosen']})" if e.get("chosen") else ""
            parts.append(f"{name} {e['speedup']:.2f}x{chosen}{bad}")
        else:
            parts.append(f"{name} n/a")
    return f"[{i}/{n}] {record['label']:<10} {record['name']:<28} " + " | ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3-shape smoke run, fewer rounds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--shapes", help="comma-separated shape indices or label/name substrings")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="seconds allowed for one torch.compile (0: no limit)")
    p.add_argument("--lowering", default="auto", help="fxfuse lowering (default auto)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 5)")
    p.add_argument("--round-ms", type=float, default=30.0, help="target length of one round")
    p.add_argument("--no-pass-time", action="store_true", help="skip pass_time.py")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 15)
    return args


def machine_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Machine description and the measured matmul peak."""
    notes = harness.setup_device(args.device)
    if args.device == "cuda":
        notes = [*notes, "TF32: cudnn.allow_tf32="
                 f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
                 f"{torch.backends.cuda.matmul.allow_tf32}, float32 matmul precision "
                 f"{matmul_precision()!r}"]
    n = 8192 if args.device == "cuda" else 2048
    peak = harness.matmul_peak_gflops(args.device, n, min_run_time=0.3 if args.quick else 1.0)
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "device": args.device, "device_notes": notes,
            "matmul_peak_gflops": peak, "matmul_n": n, "rounds": args.rounds,
            "round_ms": args.round_ms, "quick": args.quick, "lowering": args.lowering,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run_self_check(device: str) -> str:
    """``"ok"``, or the first line of the self-check's mismatch: recorded, not fatal.

    On a GPU with TF32 convolutions (the default) the loop and the hand-written grouped
    conv each differ from exact float32 by ~1e-3, differently; the sweep still runs and
    every candidate's error against the loop is in the report.
    """
    try:
        self_check(device)
    except AssertionError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "mismatch")
        print(f"warning: self-check: {line}", file=sys.stderr, flush=True)
        return f"mismatch: {line}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the reports; returns the exit code."""
    args = parse_args(argv)
    shapes = select_shapes(args.shapes, args.quick)
    meta = machine_meta(args)
    meta["self_check"] = run_self_check(args.device)
    meta["device_notes"] = [*meta["device_notes"], f"self-check: {meta['self_check']}"]
    print(f"torch {meta['torch']} on {args.device}, {torch.get_num_threads()} threads; "
          f"matmul peak {meta['matmul_peak_gflops']:.1f} GFLOP/s; {len(shapes)} shapes", flush=True)
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(CANDIDATES)
    for i, shape in enumerate(shapes, 1):
        records.append(measure_shape(shape, args, meta["matmul_peak_gflops"]))
        print(_progress(i, len(shapes), records[-1]), flush=True)
        # Written as the sweep goes, so a run stopped early still leaves its results.
        report.write_markdown(args.out / "bench.md", meta, records, names)
        report.write_json(args.out / "bench.json", meta, records)
    report.write_markdown(args.out / "bench.md", meta, records, names)
    report.write_json(args.out / "bench.json", meta, records)
    try:
        report.plot_speedups(args.out / "bench.png", records, names)
        plotted = ", bench.png"
    except ImportError as exc:     # matplotlib is optional: the tables hold every figure
        plotted = f" (no plot: {exc})"
    print(f"wrote {args.out / 'bench.md'}, bench.json{plotted}", flush=True)
    if not args.no_pass_time:
        import pass_time
        pass_time.run_and_report(args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
