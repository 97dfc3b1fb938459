"""``fxfuse weights`` on the files people have: a map too large for a .safetensors header,
the map read from the fused .pt2 or .safetensors itself, a fused .pt2 as IN, and a
pickled checkpoint with the --allow-pickle its advice names (issues 19, 20)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from cli_support import FAST, SHAPE, assert_error, project, user_code  # noqa: F401
from fxfuse.io import maps
from trust_support import run_inprocess


def _fuse(project, monkeypatch, capfd, out: str) -> None:
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build", "--weights",
                      "weights.safetensors", "--input-shape", SHAPE, "-o", out, *FAST,
                      "--no-grad-check")
    assert r.returncode == 0, r.stderr


def test_a_110_mb_map_fits_in_safetensors_metadata():
    entries = [{"fused_key": f"block_{i}.rows_fused.weight",
                "parts": [f"block_{i}.rows.{j}.weight" for j in range(8)],
                "dim": 0, "unsqueeze": None, "op": "cat"} for i in range(330_000)]
    text = json.dumps({"format": "fxfuse-weight-map/1", "entries": entries}, indent=2)
    assert len(text) > 110 << 20
    data = save({"w": torch.ones(2)}, metadata=maps.map_metadata(text))  # no "too large"
    assert load(data)["w"].shape == (2,)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    assert maps.map_from_metadata(header["__metadata__"]) == text


def test_a_large_map_is_packed_by_fuse_and_read_back_by_weights(project, monkeypatch, capfd):
    monkeypatch.setattr(maps, "PLAIN_LIMIT", 64)
    _fuse(project, monkeypatch, capfd, "fused.safetensors")
    with safe_open(str(project / "fused.safetensors"), "pt") as f:
        assert set(f.metadata()) == {maps.PACKED_NAME}
    r = run_inprocess(project, monkeypatch, capfd, "weights", "fused.safetensors",
                      "fused.safetensors", "-o", "orig.safetensors", "--to", "original")
    assert r.returncode == 0, r.stderr
    assert "the very weights the map was written with" in r.stdout


@pytest.mark.parametrize("holder", ["fused.pt2", "fused.safetensors"])
def test_weights_reads_the_map_inside_the_fused_file(project, monkeypatch, capfd, holder):
    _fuse(project, monkeypatch, capfd, holder)
    r = run_inprocess(project, monkeypatch, capfd, "weights", holder, holder, "-o", "orig.pt",
                      "--to", "original")
    assert r.returncode == 0, r.stderr
    state = torch.load(project / "orig.pt", weights_only=True)
    want = torch.load(project / "weights.pt", weights_only=True)
    assert set(state) == set(want)
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=0, atol=0)


def test_weights_given_a_binary_that_is_not_a_map_is_one_line(project, monkeypatch, capfd):
    r = run_inprocess(project, monkeypatch, capfd, "weights", "weights.pt", "weights.pt",
                      "-o", "x.pt", "--to", "fused")
    assert_error(r, 2, "not a weight map", "OUT.map.json")


def test_weights_accepts_the_allow_pickle_it_advises(project, monkeypatch, capfd):
    _fuse(project, monkeypatch, capfd, "fused.safetensors")
    sd = torch.load(project / "weights.pt", weights_only=True)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, project / "ckpt.pt")
    args = ["weights", "fused.safetensors.map.json", "ckpt.pt", "-o", "f.safetensors",
            "--to", "fused"]
    refused = run_inprocess(project, monkeypatch, capfd, *args)
    assert_error(refused, 2, "--allow-pickle")
    r = run_inprocess(project, monkeypatch, capfd, *args, "--allow-pickle")
    assert r.returncode == 0, r.stderr
