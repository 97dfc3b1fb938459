"""ONNX: ``fxfuse.export_onnx`` and ``fxfuse fuse ... -o x.onnx``, run in ONNX Runtime.

Exports are slow (seconds each): small models, few calls, timing off unless timing is
what the test is about.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxfuse
from fxfuse.cli.main import main
from fxfuse.deploy import onnx as deploy_onnx
from fxfuse.examples import RowConv1d

from cli_support import (SHAPE, assert_ok, files, project, reference, run_cli,  # noqa: F401
                         user_code)


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    model = RowConv1d(channels=3, rows=4).eval()
    x = torch.randn(6, 3, 4, 12)
    return model, x, fxfuse.fuse(model, (x,), benchmark=False)


def test_export_onnx_runs_in_onnx_runtime_at_another_batch(fused, tmp_path):
    model, x, result = fused
    out = tmp_path / "fused.onnx"
    report = fxfuse.export_onnx(result, out, (x,), original=model, benchmark=False)
    onnx.checker.check_model(str(out))
    assert report.dynamic_batch and report.reference == "original"
    assert [c.name for c in report.checks] == ["ONNX Runtime, example inputs",
                                               "ONNX Runtime, batch 7"]
    other = torch.randn(11, 3, 4, 12)
    torch.testing.assert_close(_run(out, other), model(other).detach(), rtol=1e-4, atol=1e-5)
    assert files(tmp_path) == ["fused.onnx"]           # no temp file left
    if result.changed:                                  # the map travels inside the file
        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert fxfuse.WeightMap.from_json(props["fxfuse_weight_map"]) == result.weight_map


def test_export_onnx_times_the_original_export_against_the_fused_one(tmp_path):
    model = RowConv1d(channels=3, rows=4).eval()
    x = torch.randn(4, 3, 4, 12)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    report = fxfuse.export_onnx(result, tmp_path / "m.onnx", (x,), original=model, rounds=3)
    t = report.timing
    assert t is not None and t.original.rounds == t.fused.rounds == 3
    assert 0 < t.original.q1_s <= t.original.median_s <= t.original.q3_s
    assert t.speedup_q1 <= t.speedup <= t.speedup_q3
    assert "ONNX Runtime: original" in report.summary()


def test_inputs_default_to_the_traced_shapes_and_the_fused_model_is_the_reference(fused,
                                                                                  tmp_path):
    _, _, result = fused
    report = fxfuse.export_onnx(result, tmp_path / "m.onnx")
    assert report.reference == "fused" and report.timing is None
    assert any("original=" in note for note in report.notes)


def test_a_file_that_differs_from_the_original_is_refused_and_nothing_is_written(fused,
                                                                                 tmp_path):
    model, x, result = fused
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.layers[1].bias.add_(0.5)          # one row's numbers differ
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(fxfuse.VerificationError, match="ONNX Runtime"):
        fxfuse.export_onnx(result, out, (x,), original=other_weights, benchmark=False)
    assert out.read_bytes() == b"old" and files(tmp_path) == ["m.onnx"]


def test_output_equal_to_an_input_is_refused(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"x")
    with pytest.raises(fxfuse.ConfigError, match="never overwrites its input"):
        deploy_onnx.check_onnx_output(source, [source])


def test_without_the_extra_the_cli_says_what_to_install(project, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.chdir(project)
    code = main(["fuse", "mypkg.model:build", "--input-shape", SHAPE, "-o", "out.onnx",
                 "--no-bench"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert 'pip install "fxfuse[onnx]"' in err[0] and "onnxruntime" in err[0]
    assert not (project / "out.onnx").exists()


def test_cli_writes_onnx_with_default_options(project, user_code):
    result = run_cli(project, "fuse", "mypkg.model:build", "--weights", "weights.safetensors",
                     "--input-shape", SHAPE, "-o", "fused.onnx", "--report-json", "r.json")
    assert_ok(result)
    assert "ONNX Runtime vs original PyTorch model" in result.stdout
    assert "ONNX Runtime: original" in result.stdout           # timed, interleaved
    out = project / "fused.onnx"
    onnx.checker.check_model(str(out))
    x = torch.randn(9, 3, 5, 16)
    with torch.no_grad():
        want = reference(user_code)(x)
    np.testing.assert_allclose(_run(out, x).numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert not [f for f in files(project) if f.startswith(".fused.onnx")]


@pytest.mark.parametrize("winner", ["original", "grouped"])
def test_an_onnx_file_holding_the_original_says_so(winner, monkeypatch, tmp_path):
    """``-o x.onnx`` under auto writes the original's export when no fused export runs
    faster in ONNX Runtime: the summary's first line and the JSON say what the file holds
    (the choice is forced here, not measured)."""
    from fxfuse.deploy import onnx_choice
    monkeypatch.setattr(onnx_choice, "_faster", lambda samples: winner)
    torch.manual_seed(0)
    model, x = RowConv1d(channels=3, rows=4).eval(), torch.randn(2, 3, 4, 12)
    _, fused, report = onnx_choice.write_onnx(model, tmp_path / "m.onnx", (x,), rounds=2)
    first = report.summary().splitlines()[0]
    assert fused is (winner != "original")
    assert report.to_dict()["holds"] == ("original" if winner == "original" else "fused")
    assert ("holds the original model, not fused" in first) is (winner == "original")
