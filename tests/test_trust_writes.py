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


def _loop(root: Path, name: str) -> str:
    (root / name).symlink_to(root / f"other-{name}")
    (root / f"other-{name}").symlink_to(root / name)
    return name


@pytest.mark.parametrize("where", ["out", "report", "weights"])
def test_symlink_loop_outputs_are_one_line(project, monkeypatch, capfd, where):
    if where == "weights":
        _fuse_into(project, monkeypatch, capfd, "one", "t.safetensors")
        args = ["weights", "one/t.safetensors.map.json", "one/t.safetensors", "-o",
                _loop(project, "w.pt"), "--to", "original"]
    else:
        out = _loop(project, "l.pt2") if where == "out" else "ok.pt2"
        report = ["--report-json", _loop(project, "l.json")] if where == "report" else []
        args = ["fuse", "mypkg.model:build", "--input-shape", SHAPE, "-o", out, *FAST, *report]
    r = run_inprocess(project, monkeypatch, capfd, *args)
    assert_error(r, 2, "loop of symbolic links")
    assert not (project / "ok.pt2").exists()


def test_a_pt2_whose_name_has_a_colon_is_a_file(project, monkeypatch, capfd):
    (project / "my:model.pt2").write_bytes((project / "model.pt2").read_bytes())
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "my:model.pt2",
                      "--input-shape", SHAPE)
    assert r.returncode == 0, r.stderr
    assert "1 of 1 loop sites would fuse" in r.stdout


@pytest.mark.parametrize("where", ["factory", "forward"])
def test_cancelled_error_from_the_model_is_one_line(project, monkeypatch, capfd, where):
    (project / "cancel.py").write_text(textwrap.dedent(f'''
        import asyncio
        import torch


        class M(torch.nn.Module):
            def forward(self, x):
                raise asyncio.CancelledError("stop")


        def build():
            if {where == "factory"!r}:
                raise asyncio.CancelledError()
            return M()
    '''))
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "cancel.py:build",
                      "--input-shape", SHAPE)
    assert_error(r, 2, "CancelledError")
