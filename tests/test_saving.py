"""Tests for fxfuse.io.saving: output checks, atomic writes, and each save format."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fxfuse.io import saving
from fxfuse.errors import ConfigError
from fxfuse.io.saving import (SavedModel, atomic_write, check_output_path, save_model,
                           write_sidecar)


class RowConvs(nn.Module):
    """A small per-row conv loop, the kind of model the pass rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(3, 4, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x[:, :, i]) for i, conv in enumerate(self.convs)], dim=2)


class Tied(nn.Module):
    """Two layers sharing one weight, plus a buffer that is a view of a bigger tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.arange(10.0)[2:7])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale


class FixedBatch(nn.Module):
    """A model whose code pins the batch size (so export must keep it static)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(4, -1).sum(1)


X = torch.randn(4, 3, 2, 9)


def _traced() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(RowConvs().eval())


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _raises(match: str, fn) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------- check_output_path

@pytest.mark.parametrize("out,match", [
    ("model.pt2", "never overwrites its input"),
    ("sub/../model.pt2", "never overwrites its input"),
    ("link.pt2", "never overwrites its input"),        # a hard link to the input
    ("weights.safetensors", "never overwrites its input"),
    ("out.onnx", "unknown suffix '.onnx'"),
    ("missing/out.pt2", "does not exist"),
    ("model.pt2/out.pt2", "is not a directory"),
    ("adir.pt", "is a directory"),
])
def test_check_output_path_refuses(tmp_path, out, match):
    inputs = [tmp_path / "model.pt2", tmp_path / "weights.safetensors"]
    for p in inputs:
        p.write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    (tmp_path / "adir.pt").mkdir()
    os.link(inputs[0], tmp_path / "link.pt2")
    _raises(match, lambda: check_output_path(tmp_path / out, inputs))
    assert inputs[0].read_bytes() == b"input"


@pytest.mark.parametrize("out", ["out.pt2", "out.pt", "out.safetensors", "existing.pt"])
def test_check_output_path_accepts(tmp_path, out):
    (tmp_path / "existing.pt").write_bytes(b"old output")
    assert check_output_path(tmp_path / out, [tmp_path / "model.pt2"]) == tmp_path / out


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a directory nobody can write")
def test_unwritable_directory_refused_before_any_work(tmp_path):
    # a real directory that refuses new files even to root (os.access would say yes)
    calls = []
    _raises("cannot write", lambda: check_output_path(Path("/sys/out.pt2"), []))
    _raises("cannot write", lambda: atomic_write(Path("/sys/out.pt"), calls.append))
    _raises("cannot write", lambda: save_model(_traced(), Path("/sys/out.pt2"), (X,)))
    assert calls == [] and not Path("/sys/out.pt2").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_directory_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _raises("not writable", lambda: save_model(_traced(), locked / "out.pt", (X,)))
        assert _listing(locked) == []
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------- atomic_write

def test_writer_failing_midway_leaves_nothing(tmp_path):
    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "out.pt2", writer)
    assert _listing(tmp_path) == []


def test_writer_failing_keeps_old_output(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, lambda tmp: (tmp.write_bytes(b"new"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert out.read_bytes() == b"old" and _listing(tmp_path) == ["out.pt"]


def test_os_error_becomes_config_error(tmp_path):
    def writer(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    _raises("No space left", lambda: atomic_write(tmp_path / "out.pt", writer))
    assert _listing(tmp_path) == []


def test_existing_output_replaced_atomically(tmp_path):
    out = tmp_path / "out.pt2"
    out.write_bytes(b"old")
    out.chmod(0o640)
    old_inode = out.stat().st_ino
    seen = []

    def writer(tmp: Path) -> None:
        seen.append((tmp.parent, tmp.suffix, out.read_bytes()))
        tmp.write_bytes(b"new")

    assert atomic_write(out, writer) == out
    assert seen == [(tmp_path, ".pt2", b"old")], "temp file beside the output; output untouched"
    assert out.read_bytes() == b"new" and _listing(tmp_path) == ["out.pt2"]
    assert out.stat().st_ino != old_inode, "replaced by rename, not rewritten in place"
    assert out.stat().st_mode & 0o777 == 0o640


def test_new_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.pt", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "out.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("suffix,bad", [(".map.json", False), ("", True), ("/x", True)])
def test_write_sidecar(tmp_path, suffix, bad):
    out = tmp_path / "model.pt2"
    if bad:
        _raises("bad sidecar suffix", lambda: write_sidecar(out, suffix, "{}"))
        assert _listing(tmp_path) == []
        return
    path = write_sidecar(out, suffix, '{"sites": 1}')
    assert path == tmp_path / "model.pt2.map.json"
    assert path.read_text() == '{"sites": 1}' and _listing(tmp_path) == ["model.pt2.map.json"]


# ----------------------------------------------------------------- save_model formats

def test_save_pt2_round_trip_with_extra_files(tmp_path):
    gm = _traced()
    saved = save_model(gm, tmp_path / "m.pt2", (X,), extra_files={"map.json": b'{"a": 1}'})
    assert saved == SavedModel(tmp_path / "m.pt2", "export", dynamic_batch=True)
    extra = {"map.json": ""}
    module = torch.export.load(tmp_path / "m.pt2", extra_files=extra).module()
    assert extra["map.json"] == '{"a": 1}'
    x7 = torch.randn(7, 3, 2, 9)
    torch.testing.assert_close(module(x7), gm(x7))
    assert _listing(tmp_path) == ["m.pt2"]


def test_save_pt2_static_when_batch_is_pinned(tmp_path):
    gm = torch.fx.symbolic_trace(FixedBatch())
    saved = save_model(gm, tmp_path / "m.pt2", (X,))
    assert saved.dynamic_batch is False
    torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(X), gm(X))


def test_save_pickled_graph_module(tmp_path):
    gm = _traced()   # string annotations (this file imports annotations from __future__)
    code = gm.code
    assert any(isinstance(n.type, str) for n in gm.graph.nodes)
    saved = save_model(gm, tmp_path / "m.pt", (X,), extra_files={"map.json": "{}"})
    assert saved.format == "pickle" and _listing(tmp_path) == ["m.pt"]
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule)
    torch.testing.assert_close(loaded(X), gm(X))
    assert gm.code == code, "the caller's module is left as it was"


def test_save_safetensors_with_shared_and_view_tensors(tmp_path):
    model = Tied()
    gm = torch.fx.symbolic_trace(model)
    saved = save_model(gm, tmp_path / "m.safetensors", (torch.randn(2, 5),),
                       extra_files={"fxfuse": "v1"})
    assert saved.format == "safetensors"
    tensors = load_file(tmp_path / "m.safetensors")
    expected = gm.state_dict()
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value)
    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        assert handle.metadata() == {"fxfuse": "v1"}
    assert model.scale.untyped_storage().nbytes() == 40, "the model's own tensors are untouched"


def test_save_refuses_unknown_suffix(tmp_path):
    _raises("unknown suffix", lambda: save_model(_traced(), tmp_path / "m.onnx", (X,)))
    assert _listing(tmp_path) == []


CHILD = textwrap.dedent('''
    import sys
    sys.modules["fxfuse"] = None          # any attempt to import fxfuse fails
    import torch
    module = torch.export.load(sys.argv[1]).module()
    cases = torch.load(sys.argv[2])
    for x, expected in cases:
        torch.testing.assert_close(module(x), expected)
    assert not [m for m in sys.modules if m.startswith("fxfuse") and sys.modules[m] is not None]
    print("ok", [tuple(x.shape) for x, _ in cases])
''')


def test_pt2_runs_with_bare_torch_in_another_process(tmp_path):
    gm = _traced()
    saved = save_model(gm, tmp_path / "m.pt2", (X,))
    inputs = [X] + ([torch.randn(7, 3, 2, 9)] if saved.dynamic_batch else [])
    assert len(inputs) == 2, "this conv loop should export with a dynamic batch"
    with torch.no_grad():
        torch.save([(x, gm(x)) for x in inputs], tmp_path / "expected.pt")
    run = subprocess.run([sys.executable, "-I", "-c", CHILD, str(tmp_path / "m.pt2"),
                          str(tmp_path / "expected.pt")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ok [(4, 3, 2, 9), (7, 3, 2, 9)]" in run.stdout
