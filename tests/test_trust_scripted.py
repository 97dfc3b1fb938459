"""TorchScript modules inside a model (``torch.jit.script`` / ``torch.jit.trace``): their
parameters live inside TorchScript, where torch.fx traces into ``_c.forward`` without them
and ``copy.deepcopy`` returns them as non-leaf tensors. Such a model once "fused" with a
state_dict and saved weights missing the scripted layer's parameters, and a gradient
check that could not see them; it is now one clear TraceError (CLI: exit 2, nothing
written). A scripted function, or a scripted module without tensors, still fuses.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from cli_support import assert_error, files, project, run_cli, user_code  # noqa: F401


class Rows(nn.Module):
    def __init__(self, rows=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(3, 4, 3, padding=1) for _ in range(rows))

    def forward(self, x):
        return torch.stack([c(x[:, :, h]) for h, c in enumerate(self.convs)], 2)


class WithPost(nn.Module):
    def __init__(self, post):
        super().__init__()
        self.rows, self.post = Rows(), post

    def forward(self, x):
        return self.post(self.rows(x))


def _post():
    return nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())


X = torch.randn(2, 3, 4, 16)
SCRIPTED = {
    "script": lambda: WithPost(torch.jit.script(_post())),
    "trace": lambda: WithPost(torch.jit.trace(_post(), torch.randn(2, 4, 4, 16))),
    "script-rows": lambda: nn.Sequential(torch.jit.script(nn.Linear(16, 16)), Rows()),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(SCRIPTED))
def test_scripted_submodule_with_parameters_is_a_trace_error(name, train):
    model = SCRIPTED[name]().train(train)
    with pytest.raises(fxfuse.TraceError, match="TorchScript module") as err:
        fxfuse.fuse(model, X)
    assert "\n" not in str(err.value)
    assert "pass the Python module" in str(err.value)
    assert ("`post`" if name != "script-rows" else "`0`") in str(err.value)


@torch.jit.script
def doubled(x):
    return torch.relu(x) * 2


class WithFunction(WithPost):
    def forward(self, x):
        return doubled(self.rows(x))


@pytest.mark.parametrize("post", ["scripted-relu", "scripted-function"])
def test_scripted_code_without_tensors_fuses_and_keeps_every_weight(post):
    model = WithPost(torch.jit.script(nn.ReLU())) if post == "scripted-relu" else \
        WithFunction(nn.Identity())
    model.eval()
    result = fxfuse.fuse(model, X, lowering="grouped", benchmark=False)
    assert [s.fused for s in result.sites] == [True]
    state = result.weight_map.to_original(result.model.state_dict())
    assert sorted(state) == sorted(model.state_dict())
    y = torch.randn(5, 3, 4, 16)
    torch.testing.assert_close(result.model(y), model(y), rtol=1e-4, atol=1e-5)


SOURCE = '''
import torch
from torch import nn
from mypkg.model import RowNet


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = RowNet()
        self.post = torch.jit.script(nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.post(self.rows(x))


def build():
    return Scripted().eval()
'''


@pytest.mark.parametrize("out", ["fused.safetensors", "fused.pt2"])
def test_cli_refuses_a_scripted_submodule_in_one_line(project, out):
    (project / "mypkg" / "scripted.py").write_text(SOURCE)
    before = files(project)
    done = run_cli(project, "fuse", "mypkg.scripted:build", "--input-shape", "4,3,5,16",
                   "-o", out)
    assert_error(done, 2, "`post`", "TorchScript")
    assert [f for f in files(project) if "__pycache__" not in f] == \
        [f for f in before if "__pycache__" not in f]
