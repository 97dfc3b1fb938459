"""Write ``tests/data/linear_torch-<version>.pt2`` with the torch this runs under.

The committed files were written by torch 2.4.1, 2.5.1 and 2.6.0 (``torch.export.save``'s
flat layout, export schema 5.3, 7.3 and 8.2) and torch 2.13.0 (the pt2-archive layout, one
root folder), each in a venv of its own::

    python tests/data/write_archive.py

The model is ``Linear(3, 2)`` plus a buffer, exported with a dynamic batch; the archive
carries, as the extra file ``expected.json``, the output for a batch of 6 inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.register_buffer("shift", torch.tensor([0.5, -0.25]))

    def forward(self, x):
        return self.fc(x) + self.shift


def probe() -> torch.Tensor:
    """The batch of 6 the expected output is for."""
    return torch.arange(18, dtype=torch.float32).reshape(6, 3) / 10


def main() -> None:
    torch.manual_seed(0)
    model = Linear().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=({0: batch},),
                                  strict=False)
    with torch.no_grad():
        expected = model(probe()).tolist()
    version = torch.__version__.split("+")[0]
    out = Path(__file__).with_name(f"linear_torch-{version}.pt2")
    torch.export.save(program, str(out), extra_files={"expected.json": json.dumps(expected)})
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
