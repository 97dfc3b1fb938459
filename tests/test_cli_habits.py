"""What a user expects of a command line and of ``import`` (issue 20): nothing on stderr
at import and no torch loaded for ``--help``, torch's FutureWarnings kept inside fxfuse,
``--version``, ``-q``, ``--report-json -``, help that shows defaults, stage lines on -v."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import torch

import fxfuse
from cli_support import FAST, SHAPE, project, run_cli, user_code  # noqa: F401
from trust_support import run_inprocess
from zoo.heads import HeadsIntoBuffer


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_import_prints_nothing_and_loads_no_torch():
    r = _python("import sys, fxfuse; print('torch' in sys.modules)")
    assert r.stdout.strip() == "False" and r.stderr == ""
    r = _python("import fxfuse; fxfuse.fuse; fxfuse.trace_model; print(fxfuse.ResourceError)")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_help_does_not_import_torch_and_shows_defaults():
    r = _python("import sys; from fxfuse.cli.main import build_parser\n"
                "p = build_parser(); assert 'torch' not in sys.modules, 'torch imported'\n"
                "print(p.format_help())\n"
                "print(p._subparsers._group_actions[0].choices['fuse'].format_help())")
    assert r.returncode == 0, r.stderr
    for phrase in ("--version", "examples:", "(default: 2)", "(default: auto)",
                   "symbolic_trace", "the model's own dtype", "--model-kwargs", "-q"):
        assert phrase in r.stdout, phrase


def test_version(project):
    r = run_cli(project, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fxfuse {fxfuse.__version__}"


def test_no_future_warning_reaches_the_caller():
    """The export route copies graphs whose pytree specs warn (LeafSpec) on this torch."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fxfuse.fuse(HeadsIntoBuffer().eval(), (torch.randn(2, 6, 16),), lowering="grouped",
                    benchmark=False)
    assert not [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message)[:80] for w in seen]
    with warnings.catch_warnings(record=True) as after:   # the caller's own still show
        warnings.simplefilter("always")
        warnings.warn("mine", FutureWarning)
    assert len(after) == 1


def _fuse(project, monkeypatch, capfd, *extra):
    return run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build",
                         "--input-shape", SHAPE, "-o", "out.pt2", *FAST, *extra)


def test_quiet_prints_nothing_on_success(project, monkeypatch, capfd):
    r = _fuse(project, monkeypatch, capfd, "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    assert (project / "out.pt2").is_file()


def test_report_json_dash_writes_only_json_to_stdout(project, monkeypatch, capfd):
    r = _fuse(project, monkeypatch, capfd, "--report-json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["output"].endswith("out.pt2") and data["sites"]
    assert "wrote out.pt2" in r.stderr and "the report on stdout" in r.stderr
    assert not (project / "-").exists()


def test_verbose_logs_each_stage_with_elapsed_time(project):
    r = run_cli(project, "fuse", "mypkg.model:build", "--input-shape", SHAPE, "-o", "out.pt2",
                *FAST, "-v")
    assert r.returncode == 0
    for stage in ("loading", "tracing", "matching loops", "verifying", "writing"):
        assert any(stage in line and line.rstrip().endswith("s)")
                   for line in r.stderr.splitlines()), (stage, r.stderr)
