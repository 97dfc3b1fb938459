"""The pass as fusions: one registry, one driver step, one claiming rule, tracing as a
value, and ``auto`` timing a kinds site against the same rows vectorised."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.check.decide import choose_among
from fxfuse.config import FuseConfig
from fxfuse.examples import RowConv1d
from fxfuse.passes.driver import find_sites, run_pass
from fxfuse.passes.fusion import Context
from fxfuse.passes.kinds import RowLoops, SiblingLinears
from fxfuse.passes.registry import fusions_for
from fxfuse.passes.step import apply_found
from helpers import FakeAutoClock, assert_same, module_types, timing_switch


def test_the_registry_runs_the_kinds_then_the_structural_fusion():
    assert [f.name for f in fusions_for(FuseConfig())] == ["row loops", "siblings", "rows"]
    assert [f.name for f in fusions_for(FuseConfig(lowering="vmap"))] == ["rows"]
    assert [f.name for f in fusions_for(FuseConfig(), structural=False)] == [
        "row loops", "siblings"]
    (rows, *_) = fusions_for(FuseConfig(), structural=False)
    assert isinstance(rows, RowLoops) and not rows.vectorised


class HeadsAfterRows(nn.Module):
    """A conv loop, then three Linear heads reading its output: two fusions' sites."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(3, 4, 3, padding=1) for _ in range(4))
        self.heads = nn.ModuleList(nn.Linear(8, 5) for _ in range(3))

    def forward(self, x):                                   # (B, 3, 4, 8)
        y = torch.stack([c(x[:, :, h]) for h, c in enumerate(self.convs)], 2)
        return [head(y) for head in self.heads]


def test_each_fusion_rewrites_its_own_site_and_names_follow_on():
    model = HeadsAfterRows().eval()
    x = torch.randn(2, 3, 4, 8)
    result = fxfuse.fuse(model, x, lowering="grouped", benchmark=False)
    assert [(s.name, s.lowering) for s in result.sites] == [
        ("site0", "grouped"), ("site1", "siblings")]
    assert module_types(result.model) == ["Conv1d", "Linear"]     # one of each
    assert result.model.get_submodule("convs_fused").groups == 4
    other = torch.randn(5, 3, 4, 8)
    for got, want in zip(result.model(other), model(other)):
        torch.testing.assert_close(got, want)


def test_a_node_a_rewrite_inserted_is_claimed_for_later_fusions():
    """The row loop rewritten first: its nodes are claimed; the heads reading its
    output are not, so the siblings fusion still takes them; claimed heads it leaves."""
    model = HeadsAfterRows().eval()
    x = torch.randn(2, 3, 4, 8)
    gm = fxfuse.trace_model(model, (x,))
    config = FuseConfig(lowering="grouped")
    before = set(gm.graph.nodes)
    rows = RowLoops().find(gm, Context(config, (x,)))
    apply_found(gm, RowLoops(), rows, config)
    inserted = frozenset(n for n in gm.graph.nodes if n not in before)
    assert inserted
    (heads,) = SiblingLinears().find(gm, Context(config, (x,), inserted, first=1))
    assert heads.site.name == "site1" and heads.site.rows == 3
    assert not heads.nodes & inserted
    assert SiblingLinears().find(gm, Context(config, (x,), inserted | heads.nodes)) == []


def test_inspect_lets_a_site_that_would_be_rewritten_claim_its_nodes():
    """The rows' Linears read one input, so they are siblings too; the row-loop site
    that would rewrite them claims them, and the loop is reported once."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(6, 3) for _ in range(4))

        def forward(self, x):
            return torch.stack([h(x[:, i]) for i, h in enumerate(self.heads)], 1)

    x = torch.randn(2, 4, 6)
    gm = fxfuse.trace_model(Heads(), (x,))
    sites = find_sites(gm, (x,), FuseConfig())
    assert len(sites) == 1 and sites[0].fusable and sites[0].rows == 4, sites


def test_tracing_returns_a_value_not_attributes():
    model, x = RowConv1d(rows=4), torch.randn(2, 15, 4, 12)
    traced = fxfuse.traced(model, (x,))
    assert isinstance(traced, fxfuse.Traced) and traced.tracer == "symbolic"
    assert not traced.exported and traced.fixed_mode == ""
    assert not hasattr(traced.gm, "fxfuse_trace_notes")
    assert not hasattr(traced.gm, "fxfuse_tracer")

    class Writes(nn.Module):                       # symbolic_trace cannot: export does
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(6, 2) for _ in range(3))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, 2)
            for i in range(x.shape[1]):
                out[:, i] = self.fc[i](x[:, i])
            return out

    exported = fxfuse.traced(Writes().eval(), (torch.randn(2, 3, 6),))
    assert exported.tracer == "export" and exported.exported
    assert any("torch.export" in n for n in exported.notes)
    assert fxfuse.fuse(Writes().eval(), torch.randn(2, 3, 6), benchmark=False).tracer == "export"


def _costs(costs):
    """A ``choose_among`` on a fake clock where each candidate's call costs ``costs``."""
    clock = FakeAutoClock()

    def fake(calls, **kw):
        def timed(name, call):
            def run():
                call()
                clock.now += costs.get(name, 1.0)
            return run
        kw.update(clock=clock, round_s=0.0)
        return choose_among({k: timed(k, c) for k, c in calls.items()}, **kw)
    return fake


@pytest.mark.parametrize("winner", ["vmap", "grouped"])
def test_auto_times_a_kinds_site_against_the_same_rows_vectorised(monkeypatch, winner):
    switch = timing_switch()
    monkeypatch.setattr(switch, "kinds_vmap", True)
    costs = {"loop": 1.0, "grouped": 0.8, "grouped2d": 0.8, "vmap": 0.8}
    costs[winner] = 0.2
    seen = []

    def fake(calls, **kw):
        seen.append(tuple(calls))
        return _costs(costs)(calls, **kw)
    monkeypatch.setattr(switch, "kinds", fake)
    model, x = RowConv1d(rows=4).eval(), torch.randn(2, 15, 4, 12)
    result = fxfuse.fuse(model, x, benchmark=False)
    (site,) = result.sites
    assert seen and "vmap" in seen[0] and "grouped" in seen[0], seen
    assert site.lowering == winner and dict(site.timings).keys() >= {"loop", "vmap", "grouped"}
    assert module_types(result.model).count("Conv1d") == (winner == "grouped")
    other = torch.randn(5, 15, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other), rtol=1e-5, atol=1e-5)
    assert_same(model, result, x, train=True)


def test_without_the_structural_fusion_no_vmap_is_timed(monkeypatch):
    switch = timing_switch()
    monkeypatch.setattr(switch, "kinds_vmap", True)
    seen = []

    def fake(calls, **kw):
        seen.append(tuple(calls))
        return _costs({"loop": 1.0, "vmap": 0.1})(calls, **kw)
    monkeypatch.setattr(switch, "kinds", fake)
    model, x = RowConv1d(rows=4).eval(), torch.randn(2, 15, 4, 12)
    gm = fxfuse.trace_model(copy.deepcopy(model), (x,))
    result = run_pass(gm, (x,), FuseConfig(), structural=False)
    assert seen and all("vmap" not in s for s in seen)
    assert result.sites[0].lowering != "vmap"


class PassThrough(nn.Module):
    """Three Linear rows and a column passed through, in one stack: the kinds refuse
    the join; the structural fusion takes the three rows."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(5, 5) for _ in range(3))

    def forward(self, x):                                   # (B, 4, 5)
        return torch.stack([f(x[:, i]) for i, f in enumerate(self.fc)] + [x[:, 3]], 1)


@pytest.mark.parametrize("vmap_faster", [False, True])
def test_a_loop_the_kinds_refuse_is_reported_with_the_later_fusions_decision(
        monkeypatch, vmap_faster):
    from helpers import vmap_wins
    if vmap_faster:
        vmap_wins(monkeypatch)
    model, x = PassThrough().eval(), torch.randn(2, 4, 5)
    result = fxfuse.fuse(model, x, benchmark=False)
    (site,) = result.sites
    assert site.rows == 3 and site.lowering == ("vmap" if vmap_faster else "loop")
    assert dict(site.timings).keys() == {"loop", "vmap"}, site
    other = torch.randn(5, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))
