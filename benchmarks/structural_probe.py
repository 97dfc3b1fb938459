"""The structural fusion measured: generated row models, auto's choices, pass time.

Usage::

    python benchmarks/structural_probe.py [--models N] [--out FILE]

1. Generated row models (``tests/zoo/rowgen.py``): for each op family, every op of the
   pool as the second step after a layer, each read and join spelling in turn; how many
   fuse under ``lowering="vmap"`` (and are exact at another batch size), and how many the
   default path (``auto``) rewrites.
2. What ``auto`` picks per site type on this machine, with each candidate's estimate
   (the minimum of interleaved rounds).
3. The pass time of ``fxfuse.fuse`` (verify and benchmark off) on 256 rows of a 3-op
   chain, and on 4096 rows of ``Conv1d(1, 1, 1)``, on the default path.

Writes a Markdown section to ``--out`` (default ``benchmarks/results/structural.md``).
"""
from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from zoo.rowgen import JOINS, POOLS, READS, RowModel  # noqa: E402

FIRST = {"vec": "linear", "seq": "conv1d", "img": "conv2d", "tok": "attention", "idx": "linear"}


def _outputs(out):
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def generated(limit: int) -> list[str]:
    """Per family and op: models fused under vmap (exact) and under auto."""
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    k = 0
    for family, pool in POOLS.items():
        for op in pool:
            for train in (False, True):
                read, join = READS[k % len(READS)], JOINS[k % len(JOINS)]
                k += 1
                torch.manual_seed(k)
                model = RowModel(family, [FIRST[family], op], 3, read, join).train(train)
                x = model.example()
                entry = counts[(family, op)]
                entry[0] += 1
                try:
                    r = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
                    other = model.example(batch=7)
                    with torch.no_grad():
                        ok = all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(
                            _outputs(copy.deepcopy(r.model)(other)),
                            _outputs(copy.deepcopy(model)(other))))
                    entry[1] += int(r.changed and ok)
                    d = fxfuse.fuse(model, (x,), benchmark=False)
                    entry[2] += int(d.changed)
                except fxfuse.FxFuseError as exc:
                    print(f"{family}/{op}/{read}/{join}: {type(exc).__name__}: {exc}"[:200])
    rows = ["| family | op (after a layer) | models | fused under vmap, exact | rewritten by auto |",
            "| --- | --- | --- | --- | --- |"]
    total = [0, 0, 0]
    for (family, op), (n, v, a) in counts.items():
        rows.append(f"| {family} | {op} | {n} | {v} | {a} |")
        total = [total[0] + n, total[1] + v, total[2] + a]
    rows.append(f"| all | | {total[0]} | {total[1]} | {total[2]} |")
    return rows


class Seed(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(15, 15, 3, padding=1) for _ in range(10))

    def forward(self, x):
        return torch.stack([c(x[:, :, h]) for h, c in enumerate(self.convs)], 2)


def site_types() -> list[str]:
    """auto's pick and the candidates' estimates for a few site types."""
    cases = {
        "seed conv (32,15,10,100)": (Seed().eval(), torch.randn(32, 15, 10, 100)),
        "Linear+GLU rows (64, 8 x 64)": (RowModel("vec", ["glu", "layernorm"], 8, "index", "stack"),
                                         None),
        "Embedding + Linear rows": (RowModel("idx", ["linear", "gelu"], 8, "index", "cat"), None),
        "attention inside a row": (RowModel("tok", ["attention"], 4, "index", "stack"), None),
        "Conv2d rows": (RowModel("img", ["conv2d", "relu"], 4, "index", "stack"), None),
        "RMSNorm + Linear rows": (RowModel("vec", ["rmsnorm", "linear"], 8, "select", "cat"), None),
    }
    rows = ["| site type | auto picked | candidate estimates (min of rounds) |", "| --- | --- | --- |"]
    for name, (model, x) in cases.items():
        model = model.eval()
        x = model.example(batch=64) if x is None else x
        r = fxfuse.fuse(model, (x,), benchmark=False, verify=False)
        for s in r.sites:
            times = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in s.timings)
            rows.append(f"| {name} ({s.name}) | {s.lowering or 'refused: ' + s.reason} | {times} |")
    return rows


class Chain(nn.Module):
    """n rows of Linear -> GELU -> LayerNorm on x[:, i]."""

    def __init__(self, n: int, d: int = 8):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
                                  for _ in range(n))

    def forward(self, x):
        return torch.stack([r(x[:, i]) for i, r in enumerate(self.rows)], 1)


class Tiny(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(1, 1, 1) for _ in range(n))

    def forward(self, x):
        return torch.cat([c(x[:, i:i + 1]) for i, c in enumerate(self.convs)], 1)


def pass_times() -> list[str]:
    rows = ["| model | lowering | sites fused | pass seconds |", "| --- | --- | --- | --- |"]
    for name, model, x in [("256 rows of Linear -> GELU -> LayerNorm", Chain(256).eval(),
                            torch.randn(4, 256, 8)),
                           ("4096 rows of Conv1d(1,1,1)", Tiny(4096).eval(),
                            torch.randn(2, 4096, 8))]:
        for lowering in ("auto", "vmap"):
            start = time.perf_counter()
            r = fxfuse.fuse(model, (x,), lowering=lowering, verify=False, benchmark=False)
            took = time.perf_counter() - start
            rows.append(f"| {name} | {lowering} | {sum(s.fused for s in r.sites)} of "
                        f"{len(r.sites)} ({', '.join(sorted({s.lowering for s in r.sites}))}) "
                        f"| {took:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "structural.md"))
    parser.add_argument("--skip-generated", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    parts = [f"## Structural fusion (torch {torch.__version__}, {torch.get_num_threads()} threads)", ""]
    if not args.skip_generated:
        parts += ["### Generated row models", ""] + generated(0) + [""]
    parts += ["### What auto picked, per site type", ""] + site_types() + [""]
    parts += ["### Pass time", ""] + pass_times() + [""]
    text = "\n".join(parts)
    print(text)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
