"""Peak memory of ``fxfuse inspect`` and ``fxfuse.fuse`` (the default path) against the
model's parameter bytes.

Each case runs in its own subprocess, which builds the model (H per-row ``Linear`` heads
with big weights), runs one of ``inspect`` / ``fuse`` and reports its peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``); torch tensors are not seen by
tracemalloc, so RSS it is. The figure that matters is ``fuse - inspect`` over the
parameter bytes (the goal: at most 4x).

Usage::

    python benchmarks/peak_memory.py                # 10, 100, 400 MB
    python benchmarks/peak_memory.py --sizes 10 100
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HEADS, LENGTH = 8, 512            # 8 heads of Linear(512, P): P sets the size


def _child(what: str, megabytes: int) -> None:
    import torch
    from torch import nn

    import fxfuse
    from fxfuse.passes.driver import find_sites

    class Heads(nn.Module):
        def __init__(self, out: int):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(LENGTH, out) for _ in range(HEADS))

        def forward(self, x):
            return torch.stack([h(x[:, i]) for i, h in enumerate(self.heads)], 1)

    out = max(1, megabytes * 2**20 // (4 * HEADS * (LENGTH + 1)))
    torch.manual_seed(0)
    model = Heads(out).eval()
    x = torch.randn(4, HEADS, LENGTH)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if what == "inspect":           # what `fxfuse inspect` runs
        gm = fxfuse.trace_model(model, (x,))
        find_sites(gm, (x,), fxfuse.FuseConfig())
    elif what == "fuse":
        fxfuse.fuse(model, (x,))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"what": what, "param_bytes": params, "base_kb": base, "peak_kb": peak}))


def _run(what: str, megabytes: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", what, str(megabytes)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 400])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], int(args.child[1]))
    rows = []
    for mb in args.sizes:
        got = {w: _run(w, mb) for w in ("baseline", "inspect", "fuse")}
        params = got["fuse"]["param_bytes"]
        peak = {w: got[w]["peak_kb"] * 1024 for w in got}
        rows.append({"size_mb": mb, "param_bytes": params, "peak_baseline": peak["baseline"],
                     "peak_inspect": peak["inspect"], "peak_fuse": peak["fuse"],
                     "fuse_over_inspect_x_params": (peak["fuse"] - peak["inspect"]) / params})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peak_memory.json").write_text(json.dumps(
        {"machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    lines = ["# Peak memory: `inspect` and `fuse` (default path) against parameter bytes", "",
             f"{HEADS} per-row `Linear({LENGTH}, P)` heads, input (4, {HEADS}, {LENGTH}); "
             "each figure is the peak RSS (`ru_maxrss`) of its own process; baseline = the "
             "process with the model built and torch + fxfuse imported.", "",
             "| params | baseline | inspect | fuse | (fuse - inspect) / params |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mb = [r[k] / 2**20 for k in ("param_bytes", "peak_baseline", "peak_inspect", "peak_fuse")]
        lines.append(f"| {mb[0]:.0f} MB | {mb[1]:.0f} MB | {mb[2]:.0f} MB | {mb[3]:.0f} MB | "
                     f"{r['fuse_over_inspect_x_params']:.2f}x |")
    (RESULTS / "peak_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
