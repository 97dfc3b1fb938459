"""``torch.compile(model, backend="fxfuse")``: the pass on the graphs Dynamo captures.

The inner backend is ``"eager"`` (fast): what is asserted is the graph the fxfuse
backend hands on (conv calls counted there) and the compiled model's numbers against
the eager original on several batch sizes, across recompiles and graph breaks.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.deploy.backend import count_convs, fxfuse_backend
from fxfuse.examples import RowConv1d

BATCHES = (3, 5, 8)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _x(batch: int, *rest: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *rest), generator=torch.Generator().manual_seed(seed + batch))


def test_default_options_match_the_eager_original():
    model = RowConv1d(channels=4, rows=6).eval()
    backend = fxfuse.backend(inner="eager")           # lowering "auto", verification on
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in BATCHES:
            x = _x(batch, 4, 6, 16)
            _close(compiled(x), model(x))
    assert backend.graphs, "the backend was never called"
    for graph in backend.graphs:
        assert graph.convs_before == 6
        if graph.changed:
            assert graph.convs_after < 6 and graph.verification is not None
        else:
            assert "auto kept" in graph.unchanged_because


def test_conv_calls_drop_and_recompiles_keep_working():
    model = RowConv1d(channels=4, rows=6).eval()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in BATCHES + (3,):
            x = _x(batch, 4, 6, 16)
            _close(compiled(x), model(x))
    # batch 3 static, then one graph with a dynamic batch: no compile per batch size
    assert 1 <= len(backend.graphs) <= 2
    for graph in backend.graphs:
        assert (graph.convs_before, graph.convs_after) == (6, 1)
        assert count_convs(graph.graph) == 1
        assert [s.lowering for s in graph.sites] == ["grouped"]
        assert {c.name for c in graph.verification.checks} >= {"example inputs"}


class TwoLoopsWithBreak(nn.Module):
    """Two per-row loops with a graph break between them, and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.first = RowConv1d(channels=3, rows=4)
        self.second = RowConv1d(channels=3, rows=4, kernel_size=5)
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x):
        y = torch.relu(self.first(x))
        print("", end="")                              # a graph break
        return {"out": self.second(y) * self.scale, "mid": y}


def test_graph_breaks_each_graph_is_fused():
    model = TwoLoopsWithBreak().to("cpu").eval()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (2, 7):
            x = _x(batch, 3, 4, 12)
            got, want = compiled(x), model(x)
            assert got.keys() == want.keys()
            for key in want:
                _close(got[key], want[key])
    assert len(backend.graphs) >= 2
    assert all(g.convs_before == 4 and g.convs_after == 1 for g in backend.graphs)


class Towers(nn.Module):
    """Per-row Conv1d -> BatchNorm1d -> ReLU towers (Dynamo inlines BatchNorm)."""

    def __init__(self, channels: int = 4, rows: int = 5) -> None:
        super().__init__()
        self.rows = nn.ModuleList(
            nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1),
                          nn.BatchNorm1d(channels), nn.ReLU()) for _ in range(rows))

    def forward(self, x):
        return torch.stack([row(x[:, :, h]) for h, row in enumerate(self.rows)], dim=2)


def test_towers_with_inlined_batchnorm_fuse():
    torch.manual_seed(0)
    model = Towers()
    for row in model.rows:                              # non-trivial running statistics
        row[1].running_mean.uniform_(-1, 1)
        row[1].running_var.uniform_(0.5, 2)
    model.eval()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (2, 6):
            x = _x(batch, 4, 5, 16)
            _close(compiled(x), model(x))
    assert all(g.changed and g.convs_after == 1 for g in backend.graphs), backend.graphs


def test_weights_changed_in_place_are_used():
    model = RowConv1d(channels=3, rows=4).eval()
    compiled = torch.compile(model, backend=fxfuse.backend(inner="eager", lowering="grouped"))
    x = _x(4, 3, 4, 10)
    with torch.no_grad():
        compiled(x)
        model.layers[2].weight.mul_(-2.0)               # as an optimiser step would
        model.load_state_dict({**model.state_dict(),
                               "layers.0.bias": torch.ones(3)})
        _close(compiled(x), model(x))


def test_graph_captured_with_gradients_is_handed_on_unchanged_and_trains():
    model = RowConv1d(channels=3, rows=4).train()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    x = _x(4, 3, 4, 10)
    compiled(x).square().sum().backward()
    assert backend.graphs and not backend.graphs[0].changed
    assert "gradients" in backend.graphs[0].unchanged_because
    assert all(conv.weight.grad is not None for conv in model.layers)


def test_aot_autograd_inner_backend_with_dynamic_batch():
    model = RowConv1d(channels=3, rows=4).eval()
    backend = fxfuse.backend(inner="aot_eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for batch in BATCHES:
            x = _x(batch, 3, 4, 10)
            _close(compiled(x), model(x))
    # (Dynamo's own CPU conv shape rule may still specialise the batch: one graph each)
    assert backend.graphs and all(g.convs_after == 1 for g in backend.graphs)


def test_backend_by_name_with_options():
    model = RowConv1d(channels=3, rows=4).eval()
    before = len(fxfuse_backend.graphs)
    compiled = torch.compile(model, backend="fxfuse",
                             options={"inner": "eager", "lowering": "grouped"})
    with torch.no_grad():
        x = _x(5, 3, 4, 10)
        _close(compiled(x), model(x))
    assert len(fxfuse_backend.graphs) == before + 1
    assert fxfuse_backend.graphs[-1].convs_after == 1


def test_entry_point_names_the_backend():
    tomllib = pytest.importorskip("tomllib")           # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["torch_dynamo_backends"]["fxfuse"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is fxfuse_backend


def test_bad_options_are_refused():
    with pytest.raises(fxfuse.ConfigError, match="unknown fxfuse backend option 'lowerin'"):
        fxfuse.backend(lowerin="grouped")
    with pytest.raises(fxfuse.ConfigError, match="its own inner backend"):
        fxfuse.backend(inner="fxfuse")(torch.fx.symbolic_trace(RowConv1d(3, 2)),
                                       [_x(2, 3, 2, 8)])


def test_a_refused_rewrite_hands_the_captured_graph_on(monkeypatch):
    from fxfuse.deploy import backend as backend_module

    def refuse(*args, **kwargs):
        raise fxfuse.VerificationError("numbers differ", check="example inputs")

    monkeypatch.setattr(backend_module, "verify_models", refuse)
    model = RowConv1d(channels=3, rows=4).eval()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        x = _x(3, 3, 4, 10)
        _close(compiled(x), model(x))
    graph = backend.graphs[-1]
    assert not graph.changed and "VerificationError" in graph.unchanged_because
    assert count_convs(graph.graph) == 4


class _QKV(nn.Module):
    """Sibling Linears on one input (q, k, v) and per-row GLU heads: the compile backend
    runs the one driver, so siblings and loops of identical rows fuse there too."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(16, 32) for _ in range(4))

    def forward(self, x):                                   # (B, 4, 16)
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return torch.stack([torch.nn.functional.glu(f(h[:, i]), -1)
                            for i, f in enumerate(self.heads)], 1)


def test_backend_fuses_siblings_and_identical_rows():
    model = _QKV().eval()
    backend = fxfuse.backend(inner="eager", lowering="grouped")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        x = torch.randn(3, 4, 16)
        _close(compiled(x), model(x))
    lowerings = sorted(s.lowering for g in backend.graphs for s in g.sites if s.fused)
    assert "siblings" in lowerings and ("vmap" in lowerings or "bmm" in lowerings), \
        [(s.lowering, s.reason) for g in backend.graphs for s in g.sites]
