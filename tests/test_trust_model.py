"""Models that misbehave, and what the written files must (not) carry.

Each model is real code in the user's package; the command runs on it (in a subprocess
where the exit itself is the point, in this process otherwise) and must end with one
line and exit 2, never 0 and never 1 ("verification refused") or 3.
"""
from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxfuse
from cli_support import FAST, SHAPE, assert_error, project, run_cli, user_code  # noqa: F401
from fxfuse.errors import FxFuseError
from fxfuse.weightmap import WeightMap
from trust_support import run_inprocess

BAD = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from mypkg.model import RowNet


    class ExitsInForward(RowNet):
        def forward(self, x):
            sys.exit(0)


    class InterruptsInForward(RowNet):
        def forward(self, x):
            raise KeyboardInterrupt


    class ExitsWhileTracing(RowNet):
        def forward(self, x):
            if isinstance(x, torch.fx.Proxy):
                sys.exit(1)
            return super().forward(x)


    class Chatty(RowNet):
        def forward(self, x):
            print("hello from forward {")
            return super().forward(x)


    class WithScale(RowNet):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

        def forward(self, x):
            return super().forward(x) * self.scale


    def deep(depth=1200):
        inner = RowNet()
        for _ in range(depth):
            inner = nn.Sequential(inner)
        return inner


    def exits():
        sys.exit(3)


    exits_in_forward, interrupts, exits_tracing = ExitsInForward, InterruptsInForward, ExitsWhileTracing
    chatty, with_scale = Chatty, WithScale
''')


@pytest.fixture
def bad(project):
    (project / "badmodels.py").write_text(BAD)
    return project


def _fuse(*extra, model, out="fused.safetensors"):
    return ["fuse", f"badmodels.py:{model}", "--input-shape", SHAPE, "-o", out, *FAST,
            "--no-grad-check", *extra]


def test_sys_exit_in_forward_is_an_error_not_success(bad):
    line = assert_error(run_cli(bad, *_fuse(model="exits_in_forward")), 2, "sys.exit(0)")
    assert not (bad / "fused.safetensors").exists()
    assert "forward" in line


@pytest.mark.parametrize("model,phrase", [("exits", "SystemExit"),
                                          ("interrupts", "KeyboardInterrupt"),
                                          ("exits_tracing", "sys.exit(1)")])
def test_user_code_exits_are_errors(bad, monkeypatch, capfd, model, phrase):
    result = run_inprocess(bad, monkeypatch, capfd, *_fuse(model=model))
    assert_error(result, 2, phrase)
    assert not (bad / "fused.safetensors").exists()


def test_model_nested_hundreds_deep_is_one_line(bad, monkeypatch, capfd):
    result = run_inprocess(bad, monkeypatch, capfd, *_fuse(model="deep"))
    assert_error(result, 2, "nested too deeply")


def test_model_nested_hundreds_deep_through_the_api(bad):
    from fxfuse.io.loading import _import_file
    model = _import_file(bad / "badmodels.py").deep()
    with pytest.raises(FxFuseError, match="nested too deeply"):
        fxfuse.fuse(model, (torch.randn(4, 3, 5, 16),), benchmark=False)


def test_inspect_json_stays_json_when_forward_prints(bad, monkeypatch, capfd):
    result = run_inprocess(bad, monkeypatch, capfd, "inspect", "badmodels.py:chatty",
                           "--input-shape", SHAPE, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sites"]
    assert "hello from forward" in result.stderr


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_is_accepted_anywhere(bad, where):
    args = ["inspect", "mypkg.model:broken", "--input-shape", SHAPE]
    args = [*args, "--debug"] if where == "after" else ["--debug", *args]
    result = run_cli(bad, *args)
    assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr


def test_non_persistent_buffer_stays_out_and_round_trips(bad, monkeypatch, capfd, user_code):
    result = run_inprocess(bad, monkeypatch, capfd, *_fuse(model="with_scale"))
    assert result.returncode == 0, result.stderr
    fused = load_file(str(bad / "fused.safetensors"))
    assert "scale" not in fused
    wmap = WeightMap.load(bad / "fused.safetensors.map.json")
    original = user_code[1].RowNet()
    original.register_buffer("scale", torch.ones(1), persistent=False)
    original.load_state_dict(wmap.to_original(fused), strict=True)


def test_pt2_holds_no_example_inputs(bad, monkeypatch, capfd):
    result = run_inprocess(bad, monkeypatch, capfd, *_fuse(model="chatty", out="fused.pt2"))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(bad / "fused.pt2") as z:
        samples = [i for i in z.infolist() if "/data/sample_inputs/" in i.filename]
    assert samples and all(i.file_size == 0 for i in samples)
    assert torch.export.load(str(bad / "fused.pt2")).example_inputs is None


def test_batch_1_example_still_gives_a_batch_dynamic_pt2(project, monkeypatch, capfd):
    result = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build",
                           "--input-shape", "1,3,5,16", "-o", "fused.pt2", *FAST)
    assert result.returncode == 0, result.stderr
    assert "any batch size (checked at 1," in result.stdout, result.stdout
    program = torch.export.load(str(project / "fused.pt2")).module()
    assert program(torch.randn(6, 3, 5, 16)).shape == (6, 4, 5, 16)
    assert program(torch.randn(1, 3, 5, 16)).shape == (1, 4, 5, 16)
