"""Progress: one line per stage with the elapsed time, on stderr even when it is a pipe
(the command line), and on ``logging.getLogger("fxfuse")`` at INFO (the Python API)."""
from __future__ import annotations

import logging
import re

import torch

import fxfuse
from cli_support import SHAPE, PROGRESS, project, run_cli, user_code  # noqa: F401
from fxfuse.examples import RowConv1d
from helpers import rewrites_win

LINE = re.compile(r"^fxfuse: \[(\d+\.\d)s\] (.+)$")


def _stages(stderr: str) -> list[tuple[float, str]]:
    return [(float(m.group(1)), m.group(2)) for m in map(LINE.match, stderr.splitlines()) if m]


def _in_order(messages: list[str], expected: list[str]) -> None:
    """Each expected stage appears, in this order (other lines may come between)."""
    at = 0
    for want in expected:
        found = [i for i, m in enumerate(messages) if i >= at and m.startswith(want)]
        assert found, f"no {want!r} after line {at} in {messages}"
        at = found[0] + 1


def test_fuse_prints_each_stage_on_a_piped_stderr(project):
    r = run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE, "-o", "out.pt2",
                "--lowering", "grouped")       # capture_output: stderr is a pipe
    assert r.returncode == 0, r.stderr
    stages = _stages(r.stderr)
    messages = [m for _, m in stages]
    _in_order(messages, ["loading mypkg.model:build", "tracing",
                         "checking the trace against the model", "matching loops",
                         "rewriting site0 (grouped)", "verifying the rewrite",
                         "timing the original and the fused model", "writing out.pt2"])
    times = [t for t, _ in stages]
    assert times == sorted(times), stages
    assert all(PROGRESS.match(line) for line in r.stderr.splitlines()), r.stderr
    assert "fxfuse: [" not in r.stdout                 # the report stays on stdout alone


def test_inspect_prints_its_stages_too(project):
    r = run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE)
    assert r.returncode == 0, r.stderr
    _in_order([m for _, m in _stages(r.stderr)], ["loading", "tracing", "matching loops"])


def test_quiet_silences_progress(project):
    r = run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE, "-o", "out.pt2",
                "--lowering", "grouped", "--no-bench", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_api_logs_each_stage_on_the_fxfuse_logger(monkeypatch, caplog):
    rewrites_win(monkeypatch)                 # auto decides on a fake clock, not this machine
    caplog.set_level(logging.INFO, logger="fxfuse")
    model = RowConv1d(channels=3, rows=4).eval()
    result = fxfuse.fuse(model, (torch.randn(2, 3, 4, 8),), auto_rounds=2)
    assert result.changed
    messages = [r.getMessage() for r in caplog.records if r.name == "fxfuse"]
    _in_order(messages, ["tracing (", "checking the trace against the model (",
                         "matching loops (", "timing site0: 4 rows at ", "rewriting site0 (",
                         "verifying the rewrite (", "timing the original and the fused model ("])
    assert all(re.search(r"\(\d+\.\ds\)$", m) for m in messages
               if m.startswith(("tracing", "verifying"))), messages
