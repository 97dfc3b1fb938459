"""Shared set-up for the command-line tests: a user project on disk, and running fxfuse.

The project is what a user has: a package ``mypkg`` whose ``model.py`` holds a per-row
Conv1d loop and a few factories, and that model's checkpoints saved the usual ways
(``torch.save`` of the state_dict, ``.safetensors``, a ``torch.export`` archive, the
whole pickled module). Every test gets its own copy and runs the real command in a
subprocess with the copy as its working directory.
"""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

SHAPE = "4,3,5,16"                 # batch, channels, rows, width
FAST = ("--no-bench", "--lowering", "grouped")
MAP_SUFFIX = ".map.json"

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class RowNet(nn.Module):
        """One Conv1d per row h of x[:, :, h, :], stacked back on dim 2."""

        def __init__(self, channels=3, rows=5, out=4, kernel_size=3):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.Conv1d(channels, out, kernel_size, padding=kernel_size // 2)
                for _ in range(rows))

        def forward(self, x):
            return torch.stack([conv(x[:, :, h, :]) for h, conv in enumerate(self.layers)],
                               dim=2)


    class Branchy(RowNet):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: no tracer can capture it
                return super().forward(x)
            return -super().forward(x)


    def build():
        return RowNet()


    def wide():
        return RowNet(channels=16, rows=4, out=16, kernel_size=5)


    def branchy():
        return Branchy()


    def broken():
        raise RuntimeError("factory exploded")
''')


def _write_package(root: Path) -> ModuleType:
    """Write ``mypkg`` under ``root`` and import it here (pickling needs it importable)."""
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "model.py").write_text(MODEL_SOURCE)
    for name in ("mypkg.model", "mypkg"):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("mypkg.model")
    finally:
        sys.path.remove(str(root))


@pytest.fixture(scope="session")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModuleType]:
    """The project, built once: (its directory, the imported ``mypkg.model``)."""
    root = tmp_path_factory.mktemp("template")
    module = _write_package(root)
    torch.manual_seed(0)
    net = module.build().eval()
    torch.save(net.state_dict(), root / "weights.pt")
    save_file(net.state_dict(), str(root / "weights.safetensors"))
    torch.save(net, root / "whole.pt")
    x = torch.randn(4, 3, 5, 16)
    torch.export.save(torch.export.export(net, (x,), strict=False), root / "model.pt2")
    return root, module


@pytest.fixture
def project(user_code: tuple[Path, ModuleType], tmp_path: Path) -> Path:
    """A fresh copy of the project for one test."""
    shutil.copytree(user_code[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def reference(user_code: tuple[Path, ModuleType]) -> torch.nn.Module:
    """The user's model with the checkpoint's weights, built in this process."""
    net = user_code[1].RowNet().eval()
    net.load_state_dict(load_file(str(user_code[0] / "weights.safetensors")), strict=True)
    return net


def fxfuse_command(script: bool = False) -> list[str]:
    """``python -m fxfuse``, or the installed ``fxfuse`` console script."""
    if not script:
        return [sys.executable, "-m", "fxfuse"]
    found = Path(sys.executable).with_name("fxfuse")
    path = str(found) if found.is_file() else shutil.which("fxfuse")
    assert path, "the fxfuse console script is not installed (pip install -e .)"
    return [path]


def run_cli(cwd: Path, *args: object, script: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
    """Run ``fxfuse ARGS`` in ``cwd``; text stdout/stderr captured unless redirected."""
    kwargs.setdefault("capture_output", "stderr" not in kwargs)
    return subprocess.run([*fxfuse_command(script), *map(str, args)], cwd=cwd, text=True,
                          timeout=300, **kwargs)


def files(root: Path) -> list[str]:
    """Every file and directory under ``root`` (hidden temp files included), sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if "__pycache__" not in p.parts)


PROGRESS = re.compile(r"^fxfuse: \[\d+\.\ds\] \S")   # ``fxfuse: [1.2s] tracing``


def without_progress(stderr: str) -> str:
    """``stderr`` less its progress lines (one per stage, printed unless ``-q``)."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not PROGRESS.match(line))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert without_progress(result.stderr) == "", result.stderr  # nothing but progress


def assert_error(result: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """Exit ``code`` and exactly one ``fxfuse: error:`` line on stderr holding ``phrases``
    (besides the progress lines before it)."""
    lines = without_progress(result.stderr).splitlines()
    assert result.returncode == code, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("fxfuse: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]
