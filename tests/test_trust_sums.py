"""Linears on one shared input, summed (``fc1(h) + fc2(h)``), and per-row Linear heads
summed over rows of a 3-D or 4-D activation.

Σ_h W_h x + b_h on one ``x`` is one Linear of ``x`` with the weights and biases added; the
fused module keeps the rows' weights stacked (an exact ``stack`` in the weight map) and
sums them in the graph, so the input is not repeated once per row. Rows that read their
own slices are joined on the feature dim (the last one) for one Linear over H*L features.
Every lowering and the default path end in a correct fused model; the CLI writes it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from cli_support import assert_error, project, run_cli, user_code  # noqa: F401
from helpers import assert_same, rewrites_win


class SharedSum(nn.Module):
    """``fc1(h) + fc2(h) (+ fc3(h))``, spelled several ways, on any rank of ``h``."""

    def __init__(self, spelling="add", n=2, bias=True, features=12, out=5):
        super().__init__()
        self.spelling = spelling
        self.fcs = nn.ModuleList(nn.Linear(features, out, bias=bias) for _ in range(n))

    def forward(self, h):
        if self.spelling == "relu-first":
            return self.fcs[0](torch.relu(h)) + self.fcs[1](torch.relu(h))
        outs = [fc(h) for fc in self.fcs]
        if self.spelling == "stack-mean":
            return torch.stack(outs, 0).mean(0)
        if self.spelling == "builtin":
            return sum(outs)
        total = outs[0]
        for o in outs[1:]:
            total = total + o
        return total


class SlicedSum(nn.Module):
    """Per-row heads over ``x[:, i]`` of a (B, H, T, L) input, summed over rows."""

    def __init__(self, rows=3, features=8, out=4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(features, out) for _ in range(rows))

    def forward(self, x):
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.heads)], 0).sum(0)


SHAPES = {"2d": (6, 12), "3d": (6, 4, 12), "4d": (3, 2, 4, 12)}
MODELS = {
    "add": lambda: SharedSum(),
    "add-3": lambda: SharedSum(n=3),
    "no-bias": lambda: SharedSum(bias=False),
    "builtin-sum": lambda: SharedSum("builtin", n=3),
    "stack-mean": lambda: SharedSum("stack-mean"),
    "relu-first": lambda: SharedSum("relu-first"),
}


def _linear_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.target in (F.linear, torch._C._nn.linear) or (
        n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", ["2d", "3d", "4d"])
@pytest.mark.parametrize("name", list(MODELS))
def test_shared_input_sum_is_one_linear_with_weights_added(name, shape, train):
    model = MODELS[name]().train(train)
    x = torch.randn(*SHAPES[shape])
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    assert [s.fused for s in result.sites] == [True], [s.reason for s in result.sites]
    gm = result.model
    assert _linear_calls(gm) == 1, gm.code               # one Linear, not one per row
    assert not any(n.target == "fcs" or str(n.target).startswith("fcs.")
                   for n in gm.graph.nodes if n.op in ("call_module", "get_attr")), gm.code
    # the input is read once: nothing repeats it per row (no index list, no cat)
    assert not any(n.target in (torch.cat, torch.stack) for n in gm.graph.nodes), gm.code
    assert [e.op for e in result.weight_map.entries] == \
        ["stack"] * (2 if model.fcs[0].bias is not None else 1)
    assert_same(model, result, torch.randn(SHAPES[shape][0] + 3, *SHAPES[shape][1:]), train)


@pytest.mark.parametrize("lowering", ["grouped", "grouped2d", "vmap", "auto"])
@pytest.mark.parametrize("shape", ["2d", "3d"])
def test_shared_input_sum_under_every_lowering(lowering, shape, monkeypatch):
    rewrites_win(monkeypatch)
    model = SharedSum(n=3).eval()
    x = torch.randn(*SHAPES[shape])
    result = fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False)
    assert result.changed and all(s.fused for s in result.sites), \
        [(s.lowering, s.reason) for s in result.sites]
    assert_same(model, result, torch.randn(9, *SHAPES[shape][1:]), True)


def test_shared_input_sum_on_the_default_path(monkeypatch):
    rewrites_win(monkeypatch)        # auto's choice on a fake clock: the rewrite runs
    model = SharedSum(n=2).eval()
    x = torch.randn(*SHAPES["3d"])
    result = fxfuse.fuse(model, x)
    assert [s.fused for s in result.sites] == [True], [s.reason for s in result.sites]
    other = torch.randn(7, *SHAPES["3d"][1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(other), model(other),
                                   rtol=1e-4, atol=1e-5)


def test_an_unknown_lowering_is_a_config_error():
    with pytest.raises(fxfuse.ConfigError, match="lowering='bmm'"):
        fxfuse.fuse(SharedSum(), torch.randn(*SHAPES["3d"]), lowering="bmm")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_row_heads_summed_over_a_4d_input_join_features_last(train):
    model = SlicedSum().train(train)
    x = torch.randn(4, 3, 5, 8)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    assert [s.fused for s in result.sites] == [True], [s.reason for s in result.sites]
    fused = [m for m in result.model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fused] == [(24, 4)], result.model.code
    assert_same(model, result, torch.randn(6, 3, 5, 8), train)


SHARED_SUM_SOURCE = '''
import torch
from torch import nn


class SharedSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 5)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, h):
        return self.fc1(h) + self.fc2(h)


def build():
    torch.manual_seed(0)
    return SharedSum().eval()
'''


@pytest.mark.parametrize("extra", [(), ("--lowering", "grouped"), ("--lowering", "vmap")],
                         ids=["default", "grouped", "vmap"])
def test_cli_writes_the_summed_linears(project, extra):
    (project / "mypkg" / "sums.py").write_text(SHARED_SUM_SOURCE)
    done = run_cli(project, "fuse", "mypkg.sums:build", "--input-shape", "6,4,12",
                   "-o", "fused.pt2", "--no-bench", *extra)
    assert done.returncode == 0, done.stderr
    program = torch.export.load(str(project / "fused.pt2"))
    user: dict = {}
    exec(SHARED_SUM_SOURCE, user)          # the user's model, built as the command built it
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(program.module()(x), user["build"]()(x), rtol=1e-4, atol=1e-5)


def test_cli_refuses_an_unknown_lowering_in_one_line(project):
    (project / "mypkg" / "sums.py").write_text(SHARED_SUM_SOURCE)
    done = run_cli(project, "fuse", "mypkg.sums:build", "--input-shape", "6,4,12",
                   "-o", "fused.pt2", "--lowering", "bmm")
    assert_error(done, 2, "--lowering", "bmm")
    assert not (project / "fused.pt2").exists()
