"""The ``fxfuse`` command on real files: inspect, fuse to every output format, weights, demo.

Each test runs the installed command in a subprocess, in a copy of a small user project
(see ``cli_support``), and checks what it printed, what it wrote and that what it wrote
loads and computes the user's model. Failures are in ``test_cli_errors.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_support import (FAST, MAP_SUFFIX, SHAPE, assert_ok, files, project, reference,  # noqa: F401
                         run_cli, user_code)

MAP_NAME = "fxfuse_weight_map.json"

# Runs a .pt2 where neither fxfuse nor the user's package can be imported (python -I
# also keeps the working directory off sys.path): argv = archive, input, output.
BARE_TORCH_CHILD = """
import json, sys
sys.modules["fxfuse"] = None
sys.modules["mypkg"] = None
import pytest
import torch
extra = {"%s": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
with torch.no_grad():
    torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
print(extra["%s"])
""" % (MAP_NAME, MAP_NAME)


def _fuse(project, out: str, *extra: str, model: str = "mypkg.model:build",
          weights: str | None = "weights.safetensors",
          script: bool = False) -> subprocess.CompletedProcess:
    args = ["fuse", model, "--input-shape", SHAPE, "-o", out, *FAST, *extra]
    if weights:
        args += ["--weights", weights]
    result = run_cli(project, *args, script=script)
    assert_ok(result)
    assert re.search(r"sites fused\s+1 of 1", result.stdout), result.stdout
    assert (project / out).is_file() and (project / (out + MAP_SUFFIX)).is_file()
    return result


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 3, 5, 16), generator=torch.Generator().manual_seed(seed))


def test_inspect_lists_the_loop_and_changes_nothing(project):
    before = files(project)
    result = run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE,
                     script=True)
    assert_ok(result)
    line = next(ln for ln in result.stdout.splitlines() if "layers.0" in ln)
    assert re.search(r"\b5\b", line), line  # the rows column
    assert "1 of 1 loop sites would fuse (nothing was changed)" in result.stdout
    assert files(project) == before


def test_inspect_json_says_why_a_loop_is_left_alone(project):
    result = run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE,
                     "--json")
    assert_ok(result)
    (site,) = json.loads(result.stdout)["sites"]
    assert site["rows"] == 5 and site["fusable"] is True and not site["fused"]
    assert site["targets"] == [f"layers.{h}" for h in range(5)]
    assert site["conv"]["in_channels"] == 3 and site["conv"]["out_channels"] == 4
    result = run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE,
                     "--json", "--min-rows", "6")
    assert_ok(result)
    (site,) = json.loads(result.stdout)["sites"]
    assert site["fusable"] is False and "min_rows" in site["reason"]


def test_fuse_to_pt2_runs_with_bare_torch_at_another_batch(project, user_code):
    result = _fuse(project, "fused.pt2")
    assert "wrote fused.pt2" in result.stdout and "any batch size" in result.stdout
    x = _batch(7)
    torch.save(x, project / "x.pt")
    child = subprocess.run([sys.executable, "-I", "-c", BARE_TORCH_CHILD, "fused.pt2", "x.pt",
                            "y.pt"], cwd=project, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(project / "y.pt"), reference(user_code)(x),
                                   rtol=1e-4, atol=1e-5)
    assert child.stdout.strip() == (project / ("fused.pt2" + MAP_SUFFIX)).read_text().strip()


def test_fuse_to_pt_is_a_graph_module_that_runs(project, user_code):
    _fuse(project, "fused.pt", weights="weights.pt")
    fused = torch.load(project / "fused.pt", weights_only=False)
    assert isinstance(fused, torch.fx.GraphModule)
    assert not any(name.startswith("layers.") for name, _ in fused.named_parameters())
    x = _batch(6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(user_code)(x), rtol=1e-4, atol=1e-5)


def test_weights_round_trip_is_bit_for_bit(project, user_code):
    _fuse(project, "fused.safetensors")
    fused = load_file(str(project / "fused.safetensors"))
    assert len(fused) == 2 and not any(k.startswith("layers.") for k in fused)
    map_file = "fused.safetensors" + MAP_SUFFIX
    result = run_cli(project, "weights", map_file, "fused.safetensors", "-o",
                     "original.safetensors", "--to", "original")
    assert_ok(result)
    original = load_file(str(project / "original.safetensors"))
    net = user_code[1].RowNet()
    net.load_state_dict(original, strict=True)
    expected = load_file(str(project / "weights.safetensors"))
    assert original.keys() == expected.keys()
    assert all(torch.equal(original[k], expected[k]) for k in expected)
    result = run_cli(project, "weights", map_file, "original.safetensors", "-o",
                     "refused.safetensors", "--to", "fused")
    assert_ok(result)
    assert (project / "refused.safetensors").read_bytes() == \
        (project / "fused.safetensors").read_bytes()


def test_weights_to_a_pt_checkpoint(project, user_code):
    _fuse(project, "fused.safetensors")
    result = run_cli(project, "weights", "fused.safetensors" + MAP_SUFFIX, "fused.safetensors",
                     "-o", "original.pt", "--to", "original")
    assert_ok(result)
    state = torch.load(project / "original.pt", weights_only=True)
    user_code[1].RowNet().load_state_dict(state, strict=True)
    expected = load_file(str(project / "weights.safetensors"))
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_fuse_a_torch_export_archive(project, user_code):
    _fuse(project, "fused.pt2", model="model.pt2", weights=None)
    fused = torch.export.load(str(project / "fused.pt2")).module()
    x = _batch(4, seed=3)  # exported with static shapes: same batch, new values
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(user_code)(x), rtol=1e-4, atol=1e-5)


def test_pickled_module_needs_allow_pickle(project):
    before = files(project)
    result = run_cli(project, "fuse", "whole.pt", "--input-shape", SHAPE, "-o", "fused.pt2",
                     *FAST)
    assert result.returncode == 2 and "arbitrary code" in result.stderr
    assert "--allow-pickle" in result.stderr and files(project) == before
    # the console script finds the pickled classes' package in the working directory too
    _fuse(project, "fused.pt2", "--allow-pickle", model="whole.pt", weights=None, script=True)


def test_report_json(project):
    _fuse(project, "fused.pt2", "--report-json", "report.json")
    report = json.loads((project / "report.json").read_text())
    (site,) = report["sites"]
    assert site["fused"] is True and site["rows"] == 5
    assert report["verification"]["checks"] and report["timing"] is None
    assert report["output"].endswith("fused.pt2")
    assert report["weight_map"].endswith("fused.pt2" + MAP_SUFFIX)


def test_default_auto_lowering_with_benchmark(project, user_code):
    result = run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE,
                     "--weights", "weights.pt", "-o", "fused.pt2")
    assert_ok(result)
    assert "speedup" in result.stdout and "candidate times" in result.stdout
    fused = torch.export.load(str(project / "fused.pt2")).module()
    x = _batch(5)
    with torch.no_grad():  # auto may keep the loop; either way the numbers must match
        torch.testing.assert_close(fused(x), reference(user_code)(x), rtol=1e-4, atol=1e-5)


def test_demo(tmp_path):
    result = run_cli(tmp_path, "demo", *FAST, "--out-dir", "demo")
    assert_ok(result)
    assert "matches the original" in result.stdout
    assert {p.name for p in (tmp_path / "demo").iterdir()} == {
        "seed_rowconv.safetensors", "seed_rowconv_fused.pt2",
        "seed_rowconv_fused.pt2" + MAP_SUFFIX}


def test_progress_on_a_terminal(project):
    controller, terminal = pty.openpty()
    try:
        result = run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE,
                         stdout=subprocess.PIPE, stderr=terminal)
        assert result.returncode == 0
        ready, _, _ = select.select([controller], [], [], 10)
        shown = os.read(controller, 65536).decode() if ready else ""
    finally:
        os.close(terminal)
        os.close(controller)
    assert "] loading mypkg.model:build" in shown
    assert "fxfuse:" not in result.stdout


# ------------------------------------------------------------------ the default lowering

HEADS_SOURCE = '''
import pytest
import torch
from torch import nn


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(6))

    def forward(self, x):
        return torch.stack([h(x[:, i]) for i, h in enumerate(self.heads)], 1)


def build():
    torch.manual_seed(0)
    return Heads()
'''


@pytest.mark.parametrize("out", ["fused.pt"])
def test_fuse_with_default_lowering(project, user_code, out):
    result = run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE,
                     "--weights", "weights.safetensors", "-o", out, "--no-bench")
    assert_ok(result)
    assert re.search(r"sites fused\s+[01] of 1", result.stdout), result.stdout
    if out.endswith(".pt2"):
        fused = torch.export.load(str(project / out)).module()
    else:
        fused = torch.load(str(project / out), weights_only=False)
    x = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(user_code)(x), rtol=1e-4, atol=1e-5)


def test_linear_heads_with_default_lowering(project):
    (project / "heads.py").write_text(HEADS_SOURCE)
    result = run_cli(project, "fuse", "heads.py:build", "--input-shape", "4,6,16",
                     "-o", "heads.pt2", "--no-bench")
    assert_ok(result)
    assert "candidate times" in result.stdout and "loop" in result.stdout
    fused = torch.export.load(str(project / "heads.pt2")).module()
    spec = importlib.util.spec_from_file_location("heads_ref", project / "heads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.randn(5, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), module.build()(x), rtol=1e-4, atol=1e-5)


def test_demo_with_default_lowering(tmp_path):
    result = run_cli(tmp_path, "demo", "--no-bench", "--out-dir", "demo")
    assert_ok(result)
    assert "matches the original" in result.stdout
