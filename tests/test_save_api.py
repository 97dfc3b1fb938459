"""Saving from Python (issue 20): ``result.save(path)`` writes what ``fxfuse fuse -o``
writes (a dynamic-batch .pt2 with its map inside, a .pt/.pth where the model pickles,
.safetensors weights, and OUT.map.json), and ``-o x.pt`` that cannot work is refused
before the run."""
from __future__ import annotations

import json

import pytest
import torch

import fxfuse
from cli_support import FAST, SHAPE, assert_error, project, user_code  # noqa: F401
from fxfuse.weightmap import WeightMap
from trust_support import run_inprocess
from zoo.heads import HeadsIntoBuffer
from zoo.towers import Tower


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    model = Tower().eval()
    return model, fxfuse.fuse(model, (torch.randn(2, 3, 4, 16),), lowering="grouped",
                              benchmark=False)


def test_save_pt2_has_a_dynamic_batch_and_its_map(fused, tmp_path):
    model, result = fused
    saved = result.save(tmp_path / "m.pt2")
    assert saved.dynamic_batch
    program = torch.export.load(str(tmp_path / "m.pt2"), extra_files={"fxfuse_weight_map.json": ""})
    x = torch.randn(7, 3, 4, 16)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
    wmap = WeightMap.from_json((tmp_path / "m.pt2.map.json").read_text())
    assert wmap.binding is not None and len(wmap.entries) == len(result.weight_map.entries)


@pytest.mark.parametrize("name", ["m.pt", "m.pth"])
def test_save_pickle_where_the_model_pickles(fused, tmp_path, name):
    model, result = fused
    result.save(tmp_path / name)
    back = torch.load(tmp_path / name, weights_only=False)
    x = torch.randn(3, 3, 4, 16)
    torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-5)


def test_save_safetensors_and_refuse_unknown_suffix(fused, tmp_path):
    _, result = fused
    result.save(tmp_path / "w.safetensors")
    assert json.loads((tmp_path / "w.safetensors.map.json").read_text())["entries"]
    with pytest.raises(fxfuse.ConfigError, match="unknown suffix"):
        result.save(tmp_path / "m.onnx2")
    assert not (tmp_path / "m.onnx2").exists()


def test_save_of_an_export_traced_result_to_pt_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    result = fxfuse.fuse(HeadsIntoBuffer().eval(), (torch.randn(2, 6, 16),),
                         lowering="grouped", benchmark=False)
    assert result.tracer == "export"
    with pytest.raises(fxfuse.ConfigError, match=r"cannot pickle .*save as \.pt2"):
        result.save(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
    assert result.save(tmp_path / "m.pt2").dynamic_batch


def test_pt_out_of_an_unpicklable_model_is_refused_before_the_run(project, monkeypatch, capfd):
    (project / "locked.py").write_text(
        "import threading\nfrom mypkg.model import RowNet\n\n"
        "def build():\n    m = RowNet()\n    m.lock = threading.Lock()\n    return m\n")
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "locked.py:build", "--input-shape",
                      SHAPE, "-o", "x.pt", *FAST)
    line = assert_error(r, 2, "cannot be pickled", ".pt2")
    assert "verif" not in r.stdout and "site" not in r.stdout, (line, r.stdout)
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build", "--input-shape",
                      SHAPE, "-o", "x.pt", *FAST, "--tracer", "export")
    assert_error(r, 2, "--tracer export", ".pt2")


def test_pth_is_accepted_as_output(project, monkeypatch, capfd):
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build", "--input-shape",
                      SHAPE, "-o", "x.pth", *FAST)
    assert r.returncode == 0, r.stderr
    assert torch.load(project / "x.pth", weights_only=False) is not None
