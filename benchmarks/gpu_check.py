"""One-shot GPU check: the test zoo through the default path, the sweep, TF32 figures.

Usage (from the repository root; nothing needs installing, no network)::

    PYTHONPATH=. python benchmarks/gpu_check.py --out OUT           # CUDA, ~5.5 min max
    PYTHONPATH=. python benchmarks/gpu_check.py --out /tmp/g --device cpu --budget 60

Parts, each in its own ``try`` (a failure is recorded, the rest still runs), each
stopped by a time guard so the whole stays under ``--budget`` seconds:

a. every test-zoo model (``tests/models.py`` spellings, whole models, the towers /
   heads / sums of ``tests/test_beyond_conv.py``) fused by ``fxfuse.fuse(model, inputs,
   benchmark=False)`` (``lowering="auto"``) in float32 with TF32 as torch ships it,
   float16 and bfloat16: sites fused, lowering chosen, verification error, output
   layout, or the error;
b. the benchmark sweep (``benchmarks/run.py``): loop, hand-written grouped conv,
   ``torch.compile`` (a few shapes only: compiling is slow), fxfuse;
c. the seed shape in float32, TF32 on and off: loop and fused error against float64,
   timings of loop / hand-written / hand-written + ``.contiguous()`` / fxfuse with
   ``cudnn.benchmark`` off and on;
d. a summary printed and written to ``gpu_check.md``; everything in ``gpu_check.json``.

At most 7 files land flat in ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.check.precision import matmul_precision  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_SHAPES = "seed,H256 tiny,C3->32"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240]}" if text else type(exc).__name__


class Clock:
    """Seconds left of the whole budget, and of a part's share of it."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def precision_mode() -> dict[str, Any]:
    mode = {"float32_matmul_precision": matmul_precision(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    if torch.cuda.is_available():
        mode.update(cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                    matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return mode


# ------------------------------------------------------------------ a. the zoo

def zoo() -> list[tuple[str, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], tuple]]]:
    """(name, factory, inputs-for-model) for every model of the test zoo."""
    import models as M
    cases: list = []
    try:
        from test_spellings import SPELLINGS, WHOLE
        cases += [(f"spelling/{k}", f, lambda m: (m.example(),)) for k, f in SPELLINGS.items()]
        cases += [(f"whole/{k}", make, lambda m: (torch.randn(2, *m.in_shape),))
                  for k, (make, _) in WHOLE.items()]
    except Exception as exc:  # noqa: BLE001 - fall back to the models module alone
        print(f"test_spellings not importable ({one_line(exc)}); using models.py", flush=True)
        cases += [(f"models/{n}", getattr(M, n), lambda m: (m.example(),))
                  for n in ("Seed", "Stack", "Unbind", "Shared", "ChannelChunks", "BufferWrite")]
    try:
        import test_beyond_conv as B
        for name, factory, shape, _, _ in B.CASES:
            cases.append((f"beyond/{name}", factory, lambda m, s=shape: (torch.randn(*s),)))
        cases.append(("beyond/applied-twice", B.AppliedTwice,
                      lambda m: (torch.randn(4, 4, 3, 10),)))
    except Exception as exc:  # noqa: BLE001
        print(f"test_beyond_conv not importable ({one_line(exc)})", flush=True)
    return cases


def _layout_same(got: Any, want: Any) -> bool:
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
        return got.is_contiguous() == want.is_contiguous()
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return all(_layout_same(g, w) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return all(_layout_same(got[k], want[k]) for k in want)
    return True


def fuse_one(name: str, factory: Callable, make_inputs: Callable, dtype: torch.dtype,
             device: str, auto_rounds: int) -> dict[str, Any]:
    """Fuse one model through the default path; never raises."""
    record: dict[str, Any] = {"model": name, "dtype": str(dtype).replace("torch.", "")}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = factory().to(device=device, dtype=dtype).eval()
        inputs = tuple(x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in make_inputs(model))
        result = fxfuse.fuse(model, inputs, benchmark=False, auto_rounds=auto_rounds)
        v = result.verification
        with torch.no_grad():
            same_layout = _layout_same(result.model(*inputs), model(*inputs))
        record.update(
            status="ok", sites=len(result.sites), fused=sum(s.fused for s in result.sites),
            lowerings=[s.lowering or "left alone" for s in result.sites],
            max_abs=None if v is None else v.max_abs, max_rel=None if v is None else v.max_rel,
            output_layout_same=same_layout,
            notes=[n for s in result.sites for n in s.notes if "could not time" in n])
    except fxfuse.VerificationError as exc:
        record.update(status="refused", error=one_line(exc), max_abs=exc.max_abs,
                      max_rel=exc.max_rel, check=exc.check)
    except Exception as exc:  # noqa: BLE001 - one model never stops the check
        record.update(status="error", error=one_line(exc),
                      where=traceback.format_exc().strip().splitlines()[-3:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def part_zoo(device: str, clock: Clock, until: float, auto_rounds: int) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    skipped = 0
    for name, factory, make_inputs in zoo():
        for dtype in DTYPES.values():
            if clock.elapsed() > until:
                skipped += 1
                continue
            records.append(fuse_one(name, factory, make_inputs, dtype, device, auto_rounds))
            r = records[-1]
            print(f"  {r['status']:<8} {r['dtype']:<9} {name:<45} "
                  f"{r.get('lowerings', r.get('error', ''))}", flush=True)
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        counts.setdefault(r["dtype"], {}).setdefault(r["status"], 0)
        counts[r["dtype"]][r["status"]] += 1
    return {"records": records, "counts": counts, "skipped_for_time": skipped,
            "precision_mode": precision_mode()}


# ------------------------------------------------------------------ b. the sweep

def run_sweep(out: Path, device: str, args: list[str], stem: str, timeout_s: float,
              log: list[str]) -> dict[str, Any]:
    """``benchmarks/run.py`` in a subprocess (a hung compile cannot stop the check)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", device,
               "--out", tmp, "--no-pass-time", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(5.0, timeout_s))
            log.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) \
                else (exc.stdout or "")
            log.append(f"$ {' '.join(cmd)}\n(timed out after {timeout_s:.0f} s)\n{partial}")
            status = f"timed out after {timeout_s:.0f} s"
        result: dict[str, Any] = {"status": status, "args": args}
        for suffix in ("md", "json"):
            src = Path(tmp) / f"bench.{suffix}"
            if src.is_file():
                shutil.copy(src, out / f"{stem}.{suffix}")
                result[suffix] = f"{stem}.{suffix}"
        src = Path(tmp) / "bench.json"
        if src.is_file():
            result["summary"] = sweep_summary(json.loads(src.read_text()))
    return result


def sweep_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for rec in data.get("shapes", data.get("records", [])):
        cands = rec.get("candidates", {})
        row = {"label": rec.get("label"), "loop_ms": None}
        if cands.get("loop", {}).get("status") == "ok":
            row["loop_ms"] = round(cands["loop"]["median_s"] * 1e3, 4)
        for name, e in cands.items():
            if name != "loop" and e.get("status") == "ok":
                row[name] = round(e["speedup"], 2)
                if name == "fxfuse":
                    row["fxfuse_chosen"] = e.get("chosen")
                    row["fxfuse_numerics_ok"] = e.get("numerics_ok")
                    row["fxfuse_err"] = e.get("max_abs_err")
        if "fxfuse" in row and "hand_grouped" in row:
            row["fxfuse_vs_hand"] = round(row["fxfuse"] / row["hand_grouped"], 3)
            if row.get("hand_contiguous"):
                row["fxfuse_vs_hand_contiguous"] = round(row["fxfuse"] / row["hand_contiguous"], 3)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ c. TF32 and the seed

@contextlib.contextmanager
def backend(tf32: bool | None = None, cudnn_benchmark: bool | None = None):
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def _bench_models():
    """``benchmarks/models.py`` (``tests/models.py`` owns the name ``models`` here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_models",
                                                  ROOT / "benchmarks" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_seed(device: str, rounds: int) -> dict[str, Any]:
    from fxfuse.check.bench import time_interleaved, timing_of

    bench_models = _bench_models()
    HandGrouped, RowConvLoop = bench_models.HandGrouped, bench_models.RowConvLoop

    torch.manual_seed(0)
    B, C, H, W, k, C_out = 32, 15, 10, 100, 3, 15
    loop = RowConvLoop(C, H, C_out, k).to(device).eval()
    x = torch.randn(B, C, H, W, device=device)
    out: dict[str, Any] = {"shape": f"B{B} C{C} H{H} W{W} k{k} Co{C_out}"}
    with torch.no_grad():
        ref = copy.deepcopy(loop).double()(x.double())
    for tf32 in (True, False):
        key = "tf32_on" if tf32 else "tf32_off"
        entry: dict[str, Any] = {}
        with backend(tf32=tf32):
            entry["precision_mode"] = precision_mode()
            fused = fxfuse.fuse(loop, (x,), lowering="grouped", verify=False,
                                benchmark=False).model
            with torch.no_grad():
                y_loop, y_fused = loop(x), fused(x)
            entry.update(
                loop_vs_f64=(y_loop.double() - ref).abs().max().item(),
                fused_vs_f64=(y_fused.double() - ref).abs().max().item(),
                fused_vs_loop=(y_fused - y_loop).abs().max().item(),
                output_contiguous=[y_loop.is_contiguous(), y_fused.is_contiguous()])
            try:
                res = fxfuse.fuse(loop, (x,), benchmark=False)
                entry["default_path"] = {
                    "status": "ok", "lowering": res.sites[0].lowering,
                    "max_abs": res.verification.max_abs if res.verification else None,
                    "timings_ms": {k: v * 1e3 for k, v in res.sites[0].timings}}
            except Exception as exc:  # noqa: BLE001
                entry["default_path"] = {"status": "error", "error": one_line(exc)}
        out[key] = entry
    hand = HandGrouped(loop).eval()
    fused = fxfuse.fuse(loop, (x,), lowering="grouped", verify=False, benchmark=False).model

    def call(fn):
        def run():
            with torch.inference_mode():
                return fn(x)
        return run

    fns = {"loop": call(loop), "hand_grouped": call(hand),
           "hand_grouped_contiguous": call(lambda t: hand(t).contiguous()),
           "fxfuse_grouped": call(fused)}
    for bench in (False, True):
        with backend(cudnn_benchmark=bench):
            samples = time_interleaved(fns, rounds=rounds, round_s=0.02)
        out[f"ms_cudnn_benchmark_{'on' if bench else 'off'}"] = {
            k: timing_of(v).median_s * 1e3 for k, v in samples.items()}
    return out


# ------------------------------------------------------------------ d. summary

def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"# GPU check ({report['device_name']}, torch {report['torch']})", "",
             f"- precision mode at start: {report['precision_mode']}",
             f"- total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget", ""]
    zoo_part = report["parts"].get("zoo", {})
    if "counts" in zoo_part:
        lines.append("## a. test zoo through fxfuse.fuse(model, inputs, benchmark=False)")
        for dtype, counts in zoo_part["counts"].items():
            lines.append(f"- {dtype}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if zoo_part.get("skipped_for_time"):
            lines.append(f"- skipped for time: {zoo_part['skipped_for_time']}")
        bad = [r for r in zoo_part["records"] if r["status"] != "ok"
               or not r.get("output_layout_same", True)]
        for r in bad[:40]:
            lines.append(f"  - {r['dtype']} {r['model']}: {r['status']} "
                         f"{r.get('error', '')} max_abs={r.get('max_abs')}"
                         + ("" if r.get("output_layout_same", True) else " LAYOUT DIFFERS"))
    elif "error" in zoo_part:
        lines.append(f"## a. zoo failed: {zoo_part['error']}")
    for key in ("sweep", "sweep_compile"):
        part = report["parts"].get(key, {})
        lines += ["", f"## b. {key}: {part.get('status', part.get('error', 'not run'))}"]
        for row in part.get("summary", []):
            lines.append(f"- {row.get('label')}: loop {row.get('loop_ms')} ms; " + ", ".join(
                f"{k} {v}" for k, v in row.items() if k not in ("label", "loop_ms")))
    seed = report["parts"].get("seed", {})
    lines += ["", "## c. seed shape, float32"]
    lines += [f"- {k}: {v}" for k, v in seed.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--budget", type=float, default=320.0, help="seconds for everything")
    p.add_argument("--auto-rounds", type=int, default=3)
    p.add_argument("--shapes", help="sweep only these shapes (run.py --shapes); default all")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "budget_s": args.budget, "precision_mode": precision_mode(), "parts": {}}
    log: list[str] = []
    # Shares of the budget: zoo 35 %, seed, sweep without compile ~35 %, compile sweep.
    parts = [
        ("zoo", lambda: part_zoo(device, clock, 0.35 * args.budget, args.auto_rounds)),
        ("seed", lambda: part_seed(device, rounds=5)),
        ("sweep", lambda: run_sweep(args.out, device, ["--no-compile", "--rounds", "5",
                                                       "--round-ms", "10",
                                                       *(["--shapes", args.shapes]
                                                         if args.shapes else [])], "bench_all",
                                    min(clock.left() - 0.22 * args.budget,
                                        0.40 * args.budget), log)),
        ("sweep_compile", lambda: run_sweep(
            args.out, device, ["--shapes", COMPILE_SHAPES, "--rounds", "5", "--round-ms",
                               "10", "--compile-timeout", "60"], "bench_compile",
            clock.left() - 15, log)),
    ]
    for name, run in parts:
        if clock.left() < 15:
            report["parts"][name] = {"error": "skipped: time budget spent"}
            continue
        print(f"== {name} ({clock.elapsed():.0f} s elapsed)", flush=True)
        try:
            report["parts"][name] = run()
        except Exception as exc:  # noqa: BLE001 - record and go on
            report["parts"][name] = {"error": one_line(exc),
                                     "where": traceback.format_exc().strip().splitlines()[-4:]}
        print(f"   {name} done at {clock.elapsed():.0f} s", flush=True)
    report["seconds"] = clock.elapsed()
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = summary_lines(report)
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu_check.log").write_text("\n\n".join(log))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
