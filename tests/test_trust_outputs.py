"""Outputs are a transaction: OUT, OUT.map.json and --report-json are all the new files
or all the old ones, whatever fails and whenever a signal arrives.

Each case runs the real command in a subprocess; faults are injected deterministically
(a wrapped ``os.replace``, ``os.fsync`` raising ENOSPC, a signal sent from inside the
write at a chosen call), never left to timing.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cli_support import FAST, SHAPE, assert_error, assert_ok, project, run_cli, user_code  # noqa: F401
from fxfuse.io.transaction import OutputSet
from trust_support import ours, run_inprocess, run_with_fault

MAP = "fused.safetensors.map.json"


def _fuse_args(*extra: object, out: str = "fused.safetensors", model: str = "mypkg.model:build"):
    return ["fuse", model, "--input-shape", SHAPE, "-o", out, *FAST, "--no-grad-check",
            "--report-json", "report.json", *extra]


def _snapshot(root: Path, *names: str) -> dict[str, bytes | None]:
    return {n: (root / n).read_bytes() if (root / n).is_file() else None for n in names}


def _first_run(project: Path, monkeypatch, capfd) -> dict[str, bytes | None]:
    """A good run; returns the bytes of its three outputs."""
    assert run_inprocess(project, monkeypatch, capfd, *_fuse_args()).returncode == 0
    snap = _snapshot(project, "fused.safetensors", MAP, "report.json")
    assert all(snap.values())
    return snap


def _bound_pair(project: Path) -> bool:
    """Whether OUT's embedded map and OUT.map.json are the same map (one run's pair)."""
    with safe_open(str(project / "fused.safetensors"), "pt") as f:
        inner = f.metadata()["fxfuse_weight_map.json"]
    return json.loads(inner) == json.loads((project / MAP).read_text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _replace_hook(monkeypatch, nth: int, action) -> None:
    """Call ``action(dst)`` around the ``nth`` ``os.replace`` (the commit's renames are
    OUT->backup, temp->OUT, map->backup, temp->map, report->backup, temp->report)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            action("before", dst)
        real(src, dst)
        if len(calls) == nth:
            action("after", dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("nth", [1, 4, 6], ids=lambda n: f"rename{n}")
def test_rename_failing_at_any_point_leaves_all_old_files(project, monkeypatch, capfd, nth):
    old = _first_run(project, monkeypatch, capfd)

    def fail(when, dst):
        if when == "before":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
    _replace_hook(monkeypatch, nth, fail)
    result = run_inprocess(project, monkeypatch, capfd, *_fuse_args("--rtol", "1e-3"))
    assert_error(result, 2, "previous files are unchanged")
    assert _snapshot(project, *old) == old
    assert ours(project) == []


def test_rename_failing_on_a_first_run_leaves_no_file(project, monkeypatch, capfd):
    def fail(when, dst):
        if when == "before":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
    _replace_hook(monkeypatch, 2, fail)
    result = run_inprocess(project, monkeypatch, capfd, *_fuse_args())
    assert_error(result, 2, "previous files are unchanged")
    assert _snapshot(project, "fused.safetensors", MAP, "report.json") == \
        {"fused.safetensors": None, MAP: None, "report.json": None}
    assert ours(project) == []


@pytest.mark.parametrize("nth", [2, 5])
def test_signal_during_the_commit_is_deferred_and_the_new_set_completed(project, monkeypatch,
                                                                        capfd, nth):
    old = _first_run(project, monkeypatch, capfd)

    def interrupt(when, dst):
        if when == "after":
            os.kill(os.getpid(), signal.SIGINT)
    _replace_hook(monkeypatch, nth, interrupt)
    result = run_inprocess(project, monkeypatch, capfd, *_fuse_args("--rtol", "1e-3"))
    assert result.returncode == 130, result.stderr
    assert "the move was finished" in result.stderr and "all the new files" in result.stderr
    new = _snapshot(project, *old)
    assert new["report.json"] != old["report.json"] and _bound_pair(project)
    assert ours(project) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_before_the_commit_leaves_the_old_files(project, monkeypatch, capfd, sig, code):
    old = _first_run(project, monkeypatch, capfd)
    real = OutputSet.write

    def write(self, target, data, mode=None):
        if target.name == MAP:       # OUT's temp is written, the map's not yet
            os.kill(os.getpid(), sig)
        real(self, target, data, mode)
    monkeypatch.setattr(OutputSet, "write", write)
    result = run_inprocess(project, monkeypatch, capfd, *_fuse_args("--rtol", "1e-3"))
    assert result.returncode == code, result.stderr
    assert "nothing was written" in result.stderr and "unchanged" in result.stderr
    assert _snapshot(project, *old) == old
    assert ours(project) == []


@pytest.mark.parametrize("out", ["fused.safetensors", "fused.pt2"])
def test_full_disk_is_one_line_and_keeps_the_old_files(project, monkeypatch, capfd, out):
    assert run_inprocess(project, monkeypatch, capfd, *_fuse_args(out=out)).returncode == 0
    names = (out, out + ".map.json", "report.json")
    old = _snapshot(project, *names)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    result = run_inprocess(project, monkeypatch, capfd, *_fuse_args(out=out))
    assert_error(result, 2, "No space left", "free some disk space")
    assert _snapshot(project, *names) == old
    assert ours(project) == []


def test_commit_killed_half_way_is_rolled_back_by_the_next_run(project, monkeypatch, capfd):
    old = _first_run(project, monkeypatch, capfd)
    # SIGKILL right after the new OUT replaced the old one: OUT new, map and report old
    killed = run_with_fault(project, "kill-after-replace", 2, *_fuse_args("--rtol", "1e-3"))
    assert killed.returncode == -9
    assert (project / "fused.safetensors").read_bytes() != old["fused.safetensors"]
    assert ours(project)                                   # its journal and backups
    # the next run into this directory (failing early, even) restores the old set
    assert_error(run_cli(project, *_fuse_args(out="other.safetensors",
                                              model="mypkg.model:broken")), 2, "exploded")
    assert _snapshot(project, *old) == old
    assert ours(project) == []


def test_failed_run_never_deletes_the_previous_output(project, monkeypatch, capfd):
    old = _first_run(project, monkeypatch, capfd)
    (project / "report.json").unlink()
    (project / "report.json").mkdir()          # the report path is now a directory
    assert_error(run_inprocess(project, monkeypatch, capfd, *_fuse_args()), 2, "report.json",
                 "directory")
    assert _snapshot(project, "fused.safetensors", MAP) == \
        {k: old[k] for k in ("fused.safetensors", MAP)}
    assert ours(project) == []


def test_second_writer_is_refused_while_the_first_holds_the_lock(project, monkeypatch, capfd):
    lock = project / ".fxfuse-lock.fused.safetensors"
    lock.write_text(str(os.getpid()))          # a live process holds OUT
    assert_error(run_inprocess(project, monkeypatch, capfd, *_fuse_args()), 2,
                 "another fxfuse run", str(os.getpid()))
    assert not (project / "fused.safetensors").exists() and lock.exists()


def test_stale_lock_and_temps_of_dead_runs_are_cleaned(project, monkeypatch, capfd):
    dead = _dead_pid()
    (project / ".fxfuse-lock.fused.safetensors").write_text(str(dead))
    stale = project / f".fxfuse-{dead}-0badcafe.tmp.fused.safetensors"
    live = project / f".fxfuse-{os.getpid()}-0badcafe.tmp.other.pt2"
    foreign = project / ".fused.safetensors.partial"
    for path in (stale, live, foreign):
        path.write_bytes(b"x" * 1000)
    assert run_inprocess(project, monkeypatch, capfd, *_fuse_args()).returncode == 0
    assert not stale.exists() and live.exists() and foreign.exists()
    assert not (project / ".fxfuse-lock.fused.safetensors").exists()
    assert _bound_pair(project)


@pytest.mark.parametrize("out,phrases", [
    ("a" * 300 + ".safetensors", ("File name too long", "shorter file name")),
    ("weights.pt/fused.safetensors", ("weights.pt",)),
    ("/sys/fused.safetensors", ("cannot write", "Permission denied")),
    ("/proc/fused.safetensors", ("cannot write",)),
    ("missing/fused.safetensors", ("does not exist", "create it first")),
], ids=["name-too-long", "under-a-file", "sysfs", "procfs", "missing-dir"])
def test_odd_output_paths_are_refused_before_any_work(project, monkeypatch, capfd, out, phrases):
    result = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:broken",
                           "--input-shape", SHAPE, "-o", out)
    line = assert_error(result, 2, *phrases)
    assert "exploded" not in line                  # refused before the factory ran
    assert ours(project) == []


def test_factory_that_changes_directory_does_not_move_any_path(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "mover.py").write_text(
        "import os\nfrom mypkg.model import build as _build\n\n"
        f"def build():\n    os.chdir({str(elsewhere)!r})\n    return _build()\n")
    result = run_cli(project, "fuse", "mover.py:build", "--input-shape", SHAPE,
                     "--weights", "weights.safetensors", "-o", "fused.safetensors",
                     "--report-json", "report.json", *FAST, "--no-grad-check")
    assert_ok(result)
    assert (project / "fused.safetensors").is_file() and (project / "report.json").is_file()
    assert list(elsewhere.iterdir()) == []
