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


def _fuse_into(project, monkeypatch, capfd, folder: str, out: str) -> dict[str, bytes]:
    (project / folder).mkdir(exist_ok=True)
    target = f"{folder}/{out}"
    r = run_inprocess(project, monkeypatch, capfd, "fuse", _tower(project), "--input-shape",
                      "2,3,4,16", "-o", target, *FAST, "--no-grad-check")
    assert r.returncode == 0, r.stderr
    return {n: (project / folder / n).read_bytes() for n in (out, f"{out}.map.json")}


@pytest.mark.parametrize("out", ["t.pt2", "t.safetensors", "t.pt"])
def test_the_same_fuse_twice_writes_the_same_bytes(project, monkeypatch, capfd, out):
    """No random serialization id, no graph ids, no temp names inside the files."""
    first = _fuse_into(project, monkeypatch, capfd, "one", out)
    second = _fuse_into(project, monkeypatch, capfd, "two", out)
    for name in first:
        assert first[name] == second[name], name
        assert b".fxfuse-" not in first[name], name
    if out.endswith(".pt2"):
        program = torch.export.load(str(project / "one" / out))
        assert program.module()(torch.randn(5, 3, 4, 16)).shape == (5, 4, 4, 16)


def test_converted_weights_are_the_same_bytes_twice(project, monkeypatch, capfd):
    _fuse_into(project, monkeypatch, capfd, "one", "t.safetensors")
    outs = []
    for name in ("a.pt", "b.pt"):
        r = run_inprocess(project, monkeypatch, capfd, "weights", "one/t.safetensors.map.json",
                          "one/t.safetensors", "-o", name, "--to", "original")
        assert r.returncode == 0, r.stderr
        outs.append((project / name).read_bytes())
    assert outs[0] == outs[1]
    assert set(torch.load(project / "a.pt", weights_only=True)) >= {"rows.0.0.weight"}
