"""``fxfuse fuse --decisions FILE``: recorded when FILE does not exist, reused (no timing)
when it does; refused in one line when it is not a decisions record. What auto chose is
never asserted, only that the second run reuses it."""
from __future__ import annotations

import json

from cli_support import SHAPE, assert_error, assert_ok, files, project, run_cli, user_code  # noqa: F401


def _fuse(project, *extra):
    return run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE, "--weights",
                   "weights.safetensors", "-o", "fused.pt2", "--no-bench", "--no-grad-check",
                   *extra)


def test_decisions_are_written_then_reused(project):
    first = _fuse(project, "--decisions", "decisions.json")
    assert_ok(first)
    data = json.loads((project / "decisions.json").read_text())
    assert data["format"] == "fxfuse-decisions" and len(data["entries"]) == 1
    (entry,) = data["entries"].values()
    assert entry["choice"]["threshold"] > 1 and entry["choice"]["estimates"]
    assert "decision site0:" in first.stdout and "decisions.json" in first.stdout
    before = (project / "decisions.json").read_bytes()
    second = _fuse(project, "--decisions", "decisions.json", "--report-json", "r.json")
    assert_ok(second)
    assert "reused the decisions recorded in decisions.json" in second.stdout
    assert "[recorded decision]" in second.stdout
    assert (project / "decisions.json").read_bytes() == before       # read, never rewritten
    (site,) = json.loads((project / "r.json").read_text())["sites"]
    assert site["decision"]["reused"] and site["decision"]["lowering"] == entry["lowering"]


def test_a_file_that_is_not_a_decisions_record_is_refused(project):
    (project / "decisions.json").write_text('{"entries": {}}')
    result = _fuse(project, "--decisions", "decisions.json")
    assert_error(result, 2, "not a fxfuse decisions record")
    assert "fused.pt2" not in files(project)


def test_decisions_file_may_not_be_the_output(project):
    result = _fuse(project, "--decisions", "fused.pt2.map.json")
    assert_error(result, 2, "--decisions", "choose another name")
