"""Each lowering of the seed model against the loop and the hand-written grouped conv.

Usage::

    python benchmarks/seed_lowerings.py [--threads 2] [--rounds 60] [--auto-runs 3]

The README seed model (``fxfuse.examples.RowConv1d``, 10 rows of ``Conv1d(15, 15, 3)``)
on a (32, 15, 10, 100) input, CPU. Candidates are timed interleaved, several calls a
round; each one's figure is its minimum round (the least moved by other processes).
Then ``fxfuse.fuse(model, x)`` (the default path) is run ``--auto-runs`` times and the
lowering ``auto`` picked is printed each time.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fxfuse
from fxfuse.examples import RowConv1d

SHAPE = (32, 15, 10, 100)


def hand_grouped(model: RowConv1d) -> nn.Module:
    """The hand-written recipe: rows moved into channels, one grouped Conv1d, moved back."""
    rows, conv0 = model.rows, model.layers[0]
    conv = nn.Conv1d(rows * 15, rows * 15, conv0.kernel_size[0], padding=conv0.padding[0],
                     groups=rows)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([m.weight for m in model.layers]))
        conv.bias.copy_(torch.cat([m.bias for m in model.layers]))

    class Hand(nn.Module):
        def forward(self, x):
            n, c, h, length = x.shape
            y = conv(x.permute(0, 2, 1, 3).reshape(n, h * c, length))
            return y.reshape(n, h, c, -1).permute(0, 2, 1, 3).contiguous()
    return Hand().eval()


def candidates(model: RowConv1d, x: torch.Tensor) -> dict[str, nn.Module]:
    found = {"loop": model, "hand grouped conv": hand_grouped(model)}
    for lowering in ("grouped", "grouped2d", "im2col", "vmap"):
        found[lowering] = fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False).model
    return found


def min_rounds(fns: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int
               ) -> dict[str, float]:
    names, best = list(fns), {k: float("inf") for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(3):
                fn(x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[name](x)
                best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--auto-runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x = RowConv1d().eval(), torch.randn(*SHAPE)
    fns = candidates(model, x)
    with torch.inference_mode():
        want = model(x)
        for name, fn in fns.items():
            torch.testing.assert_close(fn(x), want, rtol=1e-4, atol=1e-4, msg=name)
    best = min_rounds(fns, x, args.rounds, args.calls)
    print(f"seed {SHAPE}, {args.threads} threads, min of {args.rounds} interleaved rounds "
          f"of {args.calls} calls")
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds * 1e3:8.3f} ms   {best['loop'] / seconds:5.2f}x the loop")
    for run in range(args.auto_runs):
        t0 = time.perf_counter()
        result = fxfuse.fuse(model, (x,))
        print(f"  default path run {run + 1}: auto chose {result.sites[0].lowering}; fuse took "
              f"{time.perf_counter() - t0:.1f} s; {result.sites[0].decision['rule']}")


if __name__ == "__main__":
    main()
