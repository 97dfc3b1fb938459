"""Deployment figures: ONNX Runtime and torch.compile, with and without fxfuse.

Usage::

    python benchmarks/deploy.py                     # seed, H64, B1 shapes
    python benchmarks/deploy.py --shapes 32,15,10,100 --rounds 21

Per shape (B, C, H, W; Conv1d(C, C, 3) per row), two groups, each timed interleaved in
one process (medians of per-round ratios, with q1-q3):

- ONNX Runtime: the loop model's export vs the fused model's export (``grouped``).
- PyTorch: eager loop, eager fused (``fxfuse.fuse``, default ``auto``),
  ``torch.compile`` of the loop (Inductor), ``torch.compile(backend=fxfuse.backend())``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxfuse  # noqa: E402
from fxfuse.check.bench import timing_of, time_interleaved  # noqa: E402
from fxfuse.deploy.onnx import _export, _runners  # noqa: E402
from fxfuse.examples import RowConv1d  # noqa: E402

DEFAULT_SHAPES = ("32,15,10,100", "32,15,64,100", "1,15,10,100")


def _ratio_line(samples: dict[str, list[float]], base: str) -> list[str]:
    lines = []
    for name, times in samples.items():
        t = timing_of(times)
        r = timing_of([a / b for a, b in zip(samples[base], times)])
        lines.append(f"  {name:<18} {t.median_s * 1e3:8.3f} ms (IQR {t.q1_s * 1e3:.3f}-"
                     f"{t.q3_s * 1e3:.3f})  {r.median_s:5.2f}x vs {base} "
                     f"[{r.q1_s:.2f}-{r.q3_s:.2f}]")
    return lines


def _measure_ort(model, fused, x, rounds: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ORT original": Path(tmp) / "o.onnx", "ORT fused": Path(tmp) / "f.onnx"}
        _export(model, (x,), paths["ORT original"], None)
        _export(fused, (x,), paths["ORT fused"], None)
        samples = time_interleaved(_runners(paths, (x,)), rounds=rounds, round_s=0.05)
    return _ratio_line(samples, "ORT original")


def measure(shape: tuple[int, ...], rounds: int) -> list[str]:
    batch, channels, rows, width = shape
    torch.manual_seed(0)
    model = RowConv1d(channels, rows).eval()
    x = torch.randn(shape)
    out = [f"shape {shape}"]
    grouped = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        out.append("  ONNX Runtime: not installed")
    else:
        out += _measure_ort(model, grouped.model, x, rounds)
    print("\n".join(out), flush=True)
    out = []
    auto = fxfuse.fuse(model, (x,), benchmark=False)
    torch._dynamo.reset()
    start = time.perf_counter()
    loop_compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        loop_compiled(x)
    t_loop = time.perf_counter() - start
    backend = fxfuse.backend()
    start = time.perf_counter()
    fused_compiled = torch.compile(copy.deepcopy(model), backend=backend, dynamic=False)
    with torch.inference_mode():
        fused_compiled(x)
    t_fused = time.perf_counter() - start

    def call(fn):
        def run():
            with torch.inference_mode():
                return fn(x)
        return run

    fns = {"eager loop": call(model), "eager fused": call(auto.model),
           "compile(loop)": call(loop_compiled), "compile(fxfuse)": call(fused_compiled)}
    samples = time_interleaved(fns, rounds=rounds, round_s=0.05)
    out += _ratio_line(samples, "eager loop")
    chosen = [s.lowering for g in backend.graphs for s in g.sites]
    out.append(f"  eager fused chose {[s.lowering for s in auto.sites]}; compile(fxfuse) chose "
               f"{chosen}; compile times: loop {t_loop:.1f} s, fxfuse {t_fused:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None,
                   help="B,C,H,W[;B,C,H,W...] (default: " + "; ".join(DEFAULT_SHAPES) + ")")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    shapes = args.shapes.split(";") if args.shapes else list(DEFAULT_SHAPES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for text in shapes:
        shape = tuple(int(v) for v in text.split(","))
        print("\n".join(measure(shape, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
