"""Writing outputs that every model has: BatchNorm's 0-dim integer buffer, the same
bytes from the same fuse, and output paths that cannot be written (issue 19)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from cli_support import FAST, SHAPE, assert_error, project, user_code  # noqa: F401
from trust_support import run_inprocess

TOWER = textwrap.dedent('''
    import torch
    from torch import nn


    class Tower(nn.Module):
        def __init__(self, rows=4, c=3):
            super().__init__()
            self.rows = nn.ModuleList(
                nn.Sequential(nn.Conv1d(c, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
                for _ in range(rows))

        def forward(self, x):
            return torch.stack([m(x[:, :, h, :]) for h, m in enumerate(self.rows)], dim=2)


    def build():
        torch.manual_seed(0)
        return Tower()
''')


def _tower(root: Path) -> str:
    (root / "tower.py").write_text(TOWER)
    return "tower.py:build"


@pytest.mark.parametrize("out", ["t.pt2", "t.safetensors"])
def test_batchnorm_tower_writes_its_outputs(project, monkeypatch, capfd, out):
    """num_batches_tracked (a 0-dim int64 buffer) is hashed into the weight map's binding."""
    r = run_inprocess(project, monkeypatch, capfd, "fuse", _tower(project), "--input-shape",
                      "2,3,4,16", "-o", out, *FAST, "--no-grad-check")
    assert r.returncode == 0, r.stderr
    assert (project / out).is_file() and (project / f"{out}.map.json").is_file()
