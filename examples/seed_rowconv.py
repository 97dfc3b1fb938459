"""The seed question end to end: a per-row Conv1d loop at (32, 15, 10, 100).

Run:  python examples/seed_rowconv.py [--lowering auto|grouped|grouped2d]

Traces the model, rewrites the loop, checks the numbers (example batch, another batch
size, gradients in train mode), times both models interleaved and prints the report,
then the traced forward before and after.
"""
from __future__ import annotations

import argparse

import torch

import fxfuse
from fxfuse.examples import SEED_SHAPE, RowConv1d, RowConvNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lowering", default="auto", choices=["auto", "grouped", "grouped2d"])
    parser.add_argument("--net", action="store_true",
                        help="use the larger model (joint Conv2d + loop + head)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = (RowConvNet() if args.net else RowConv1d()).eval()
    x = torch.randn(*SEED_SHAPE)
    result = fxfuse.fuse(model, (x,), lowering=args.lowering)

    print(result.report())
    print("\n# traced forward, before\n" + result.code_before.strip())
    print("\n# after\n" + result.code_after.strip())
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    main()
