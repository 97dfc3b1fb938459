"""Models that are hard to copy and runs that run out of memory (issue 19): a
``threading.Lock`` on the model is shared with the copies, not a crash; out of memory is
a ResourceError (exit 2) that names what ran out and how much was asked for."""
from __future__ import annotations

import copy
import textwrap
import threading

import pytest
import torch
from torch import nn

import fxfuse
from cli_support import FAST, assert_error, project, user_code  # noqa: F401
from trust_support import run_inprocess

SOURCE = textwrap.dedent('''
    import threading
    import torch
    from torch import nn


    class Rows(nn.Module):
        def __init__(self, rows=4):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv1d(3, 4, 3, padding=1) for _ in range(rows))

        def forward(self, x):
            return torch.stack([c(x[:, :, h, :]) for h, c in enumerate(self.convs)], dim=2)


    class Locked(Rows):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()
            self.options = {"guard": threading.RLock(), "scale": 2}

        def forward(self, x):
            with self.lock:
                return super().forward(x) * self.options["scale"]


    class Hungry(Rows):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            if type(self).calls > 3:          # the first runs pass, verification does not
                torch.empty(1 << 50)          # 4 PiB: fails at once, allocates nothing
            return super().forward(x)


    def locked():
        torch.manual_seed(0)
        return Locked().eval()


    def hungry():
        return Hungry().eval()
''')


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "hard_models.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("hard_models", None)
    return importlib.import_module("hard_models")


def test_a_model_holding_a_lock_fuses_and_shares_the_lock(models):
    model = models.locked()
    x = torch.randn(2, 3, 4, 16)
    result = fxfuse.fuse(model, (x,), lowering="grouped", bench_rounds=2)
    assert [s.fused for s in result.sites] == [True]
    assert any("lock (lock)" in n and "shares" in n for n in result.notes), result.notes
    y = torch.randn(5, 3, 4, 16)
    torch.testing.assert_close(result.model(y), model(y), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError):              # deepcopy is itself again afterwards
        copy.deepcopy(threading.Lock())


def test_a_model_holding_a_lock_fuses_through_the_cli(project, monkeypatch, capfd):
    (project / "hard_models.py").write_text(SOURCE)
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "hard_models.py:locked",
                      "--input-shape", "2,3,4,16", "-o", "out.pt2", *FAST)
    assert r.returncode == 0, r.stderr
    assert (project / "out.pt2").is_file()


def test_out_of_memory_is_a_resource_error_naming_the_size(models):
    with pytest.raises(fxfuse.errors.ResourceError, match=r"out of CPU memory .*4\.0 PiB"):
        fxfuse.fuse(models.hungry(), (torch.randn(2, 3, 4, 16),), lowering="grouped",
                    benchmark=False)


def test_out_of_memory_is_exit_2_on_the_command_line(project, monkeypatch, capfd):
    (project / "hard_models.py").write_text(SOURCE)
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "hard_models.py:hungry",
                      "--input-shape", "2,3,4,16", "-o", "out.pt2", *FAST)
    assert_error(r, 2, "out of CPU memory", "PiB")
    assert not (project / "out.pt2").exists()


def test_memory_error_is_a_resource_error():
    class Raises(nn.Module):
        def forward(self, x):
            raise MemoryError
    with pytest.raises(fxfuse.errors.ResourceError, match="out of CPU memory"):
        fxfuse.fuse(Raises(), (torch.randn(2, 3),), benchmark=False)
