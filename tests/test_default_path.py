"""The default path (``fxfuse.fuse(model, inputs, benchmark=False)``, ``lowering="auto"``)
on every kind of site: exact numbers, outputs laid out as the original's, timings for
every rewritten site, untimed sites kept as loops. Auto's choice itself is not asserted:
it depends on the machine."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.structural.extract import CannotCut
from fxfuse.structural.fusion import RowsByStructure
import fxfuse.check.auto as auto
from types import SimpleNamespace

from zoo import spellings, whole
import test_beyond_conv as B
from conftest import AUTO_ROUNDS, check, check_layout, fresh_inputs, leaves
from test_spellings import WHOLE
from zoo.towers import convs

M = SimpleNamespace(**{**vars(spellings), **vars(whole)})


def _fuse(model, inputs, **options):
    return fxfuse.fuse(model, inputs, benchmark=False, auto_rounds=AUTO_ROUNDS, **options)


def _assert_timed(result):
    for site in result.sites:
        if site.fused or site.lowering == "loop":
            names = [k for k, _ in site.timings]
            assert names and names[0] == "loop" and len(names) >= 2, site
            assert all(v > 0 for _, v in site.timings), site.timings


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
@pytest.mark.parametrize("make,sites", WHOLE.values(), ids=WHOLE.keys())
def test_whole_model_default_path(make, sites, tracer):
    model = make()
    result = check(model, (torch.randn(2, *model.in_shape),), expect_fused=sites,
                   tracer=tracer)
    _assert_timed(result)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,label,modules", B.CASES, ids=[c[0] for c in B.CASES])
def test_beyond_conv_default_path(name, factory, shape, label, modules, train):
    torch.manual_seed(0)
    model = factory().train(train)
    result = _fuse(model, (torch.randn(*shape),))
    assert len(result.sites) == 1 and result.sites[0].fusable, result.sites
    site = result.sites[0]
    assert site.lowering in ("loop", label, "grouped", "grouped2d", "im2col"), site
    _assert_timed(result)
    B._assert_same(model, result, torch.randn(shape[0] + 3, *shape[1:]), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_applied_twice_default_path(train):
    model = B.AppliedTwice().train(train)
    result = _fuse(model, (torch.randn(4, 4, 3, 10),))
    assert len(result.sites) == 2 and len({s.lowering for s in result.sites}) == 1
    _assert_timed(result)
    B._assert_same(model, result, torch.randn(5, 4, 3, 10), train)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp16", "bf16", "fp64"])
@pytest.mark.parametrize("make", [M.Seed, M.Shared, M.ChannelChunks], ids=["seed", "shared",
                                                                           "chunks"])
def test_dtypes_default_path(make, dtype):
    model = make().to(dtype)
    check(model, (model.example(dtype=dtype),), 1)


def test_report_shows_timings():
    model = B.Heads()
    result = _fuse(model, (torch.randn(5, 6, 16),))
    table = result.report()
    assert "loop" in table and " ms" in table, table


# ------------------------------------------------------------------ what auto times

def test_cut_out_holds_every_rows_whole_chain():
    gm = fxfuse.trace_model(B.Tower().eval(), (torch.randn(2, 3, 4, 16),))
    site = fxfuse.find_row_sites(gm)[0]
    loop = auto.extract_loop(gm, site)
    calls = [n for n in loop.graph.nodes if n.op == "call_module"]
    assert len(calls) == 4 * 5, loop.code              # 4 rows x (conv, bn, relu, drop, conv)
    x = torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(loop(x), gm(x))


def test_timing_inputs_follow_traced_layout_and_dtype():
    model = M.PermutedSource().to(torch.float64)
    x = model.example(dtype=torch.float64)
    gm = fxfuse.trace_model(model, (x,))
    site = fxfuse.find_row_sites(gm)[0]
    (source,) = auto.timing_inputs(auto.extract_loop(gm, site), torch.device("cpu"))
    traced = next(n for n in gm.graph.nodes if n.name == site.source).meta["tensor_meta"]
    assert source.dtype == torch.float64 and tuple(source.shape) == tuple(traced.shape)
    assert source.stride() == tuple(traced.stride)


def test_untimed_site_is_kept_as_a_loop(monkeypatch):
    def cannot(gm, site):
        raise auto.CannotTime("the loop reads `mask` from outside")

    def cannot_cut(self, gm, found):
        raise CannotCut("the loop reads `mask` from outside")

    monkeypatch.setattr(auto, "extract_loop", cannot)
    monkeypatch.setattr(RowsByStructure, "candidates", cannot_cut)
    model = M.Seed()
    x = model.example()
    result = _fuse(model, (x,))
    site = result.sites[0]
    assert site.lowering == "loop" and not result.changed and not site.timings
    assert any("could not time" in n and "mask" in n for n in site.notes), site.notes
    assert "not timed" in result.report()
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_candidate_that_fails_to_run_is_an_error_naming_the_site(monkeypatch):
    """A rewrite that breaks is a bug to see: auto must not turn it into "kept as loop"."""
    real = auto._candidates

    def broken(loop, site, lowerings):
        fns = real(loop, site, lowerings)
        fns["grouped"].forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        return fns

    monkeypatch.setattr(auto, "_candidates", broken)
    with pytest.raises(fxfuse.FxFuseError, match=r"site0 .*grouped.*boom"):
        _fuse(M.Seed(), (M.Seed().example(),))


@pytest.mark.parametrize("target", ["rewrite_site", "rewrite_siblings"])
def test_a_rewrite_that_raises_under_auto_propagates(monkeypatch, target):
    """The rewrite entry point raising (a rewriter bug) propagates from ``fuse`` as an
    error that names the site, for row loops and sibling Linears alike."""
    from fxfuse.errors import InternalError

    def bug(*args, **kwargs):
        raise KeyError("rewriter bug")

    model = M.Seed() if target == "rewrite_site" else _Siblings()
    module = auto
    monkeypatch.setattr(module, target, bug)
    x = model.example() if hasattr(model, "example") else torch.randn(4, 16)
    with pytest.raises(InternalError, match=r"site\d+ .*rewriter bug") as info:
        _fuse(model, (x,))
    assert isinstance(info.value.__cause__, KeyError)


class _Siblings(nn.Module):
    """Three Linears on one input (q, k, v, an attention score): one sibling site."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 8) for _ in range(3))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


# ------------------------------------------------------------------ layout copies

class SiteThenHead(nn.Module):
    """A loop whose result goes through a ReLU into a Conv2d head (no copy needed)."""

    def __init__(self, then="conv"):
        super().__init__()
        self.then = then
        self.layers = convs(4, 3, 5)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = torch.stack([c(x[:, :, h]) for h, c in enumerate(self.layers)], 2).relu()
        if self.then == "conv":
            return self.head(y)
        if self.then == "view":
            return y.view(y.shape[0], -1)
        if self.then == "sum":
            return y.sum(-1)
        return y * 2.0


def _copies(gm):
    """Copies that move elements: ``.contiguous()`` of a permuted view (one of an already
    contiguous tensor, as put before an output, is free)."""
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous"
            and n.args[0].op == "call_method" and n.args[0].target == "permute"]


@pytest.mark.parametrize("lowering", ["grouped", "grouped2d"])
@pytest.mark.parametrize("then,copies", [("conv", 0), ("view", 1), ("output", 1), ("sum", 1)])
def test_layout_copy_only_where_needed(then, copies, lowering):
    model = SiteThenHead(then).eval()
    x = torch.randn(2, 3, 4, 10)
    result = fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False)
    gm = result.model
    if then == "conv" or lowering == "grouped":
        assert len(_copies(gm)) == copies, gm.code
    other = fresh_inputs((x,), 3)
    with torch.no_grad():
        want, got = model(*other), gm(*other)
    for w, g in zip(leaves(want), leaves(got), strict=True):
        torch.testing.assert_close(g, w)
        check_layout(g, w)


def test_copy_kept_before_inplace_use_of_an_exported_row():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = convs(3, 2, 2)

        def forward(self, x):
            y = torch.stack([c(x[:, :, h]) for h, c in enumerate(self.layers)], 2)
            return F.relu(y, inplace=True).sum()

    model = InPlace().eval()
    x = torch.randn(2, 2, 3, 6)
    result = _fuse(model, (x,))
    torch.testing.assert_close(result.model(x), model(x))
