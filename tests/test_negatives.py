"""Loops the pass must leave alone: found, not fused, a reason naming the cause, and the
output model computing exactly what the original does."""
from __future__ import annotations

import pytest
import torch

import fxfuse
from zoo import spellings, refused, whole
from conftest import assert_left_alone, check

NEGATIVES = {
    "every-row-another-kernel-size": (refused.KernelSizes, {}, ("rows differ", "kernel_size")),
    "some-rows-share-a-module": (refused.PartlyShared, {}, ("share", "untie")),
    "row-reads-previous-row-plus-input": (refused.Recurrent, {}, ("depend",)),
    "row-reads-previous-row": (refused.Feedback, {}, ("depend",)),
    "buffer-row-reads-previous-row": (refused.BufferFeedback, {}, ("depend",)),
    "fewer-rows-than-min-rows": (spellings.Seed, {"min_rows": 5}, ("4 rows", "min_rows=5")),
    "weight-tied-outside-the-loop": (refused.TiedOutside, {}, ("layers.0.weight", "outside the loop")),
    # the kinds' refusal; on the default path the structural fusion times the rows too
    "buffer-of-another-dtype": (refused.DtypeChange, {"lowering": "grouped"}, ("float64",)),
    "rows-with-tied-weights": (refused.TiedRows, {"check_grads": False},
                               ("layers.1.weight", "tied to layers.0.weight")),
}


# Loops the row-op kinds refuse but that are the same code per row: matched by
# structure and vectorised. (name: model, rows fused, rows left as they were)
STRUCTURAL = {
    "different-out-channels": (refused.OutChannels, 4),      # padded to the widest row
    "unsqueezed-row-also-returned": (refused.RowAlsoReturned, 4),
    "forward-hook-on-one-row": (refused.Hooked, 3),
    "conv1d-subclass-custom-forward": (refused.CustomForward, 3),
    "per-row-cumsum": (lambda: refused.PerRowOp("cumsum"), 4),
    "per-row-softmax": (lambda: refused.PerRowOp("softmax"), 4),
    "cat-joins-a-non-conv-tensor": (refused.CatWithInput, 4),
    "one-row-frozen": (refused.PartlyFrozen, 3),
    "weight-norm-on-one-row": (refused.WeightNormed, 3),
    "buffer-partly-written": (refused.PartialBuffer, 4),
}


@pytest.mark.parametrize("make,rows", STRUCTURAL.values(), ids=STRUCTURAL.keys())
def test_refused_by_kinds_fused_by_structure(make, rows):
    """Forced ``vmap``: exactly the legal rows fuse (hooked, frozen or reparametrised
    rows stay as they were), the model is exact at another batch size."""
    model = make()
    x = model.example()
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    fused = [s for s in result.sites if s.fused]
    assert [s.rows for s in fused] == [rows] and fused[0].lowering == "vmap"
    assert any(n.target == "fused_rows" or str(n.target).startswith("fused_rows")
               for n in result.model.graph.nodes if n.op == "get_attr")
    other = torch.randn(x.shape[0] + 3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(other), model.eval()(other))


@pytest.mark.parametrize("make,options,words", NEGATIVES.values(), ids=NEGATIVES.keys())
def test_left_alone(make, options, words):
    model = make()
    assert_left_alone(model, (model.example(),), *words, **options)


def test_left_alone_in_every_lowering():
    model = refused.KernelSizes()
    for lowering in ("grouped", "grouped2d", "auto"):
        site = assert_left_alone(model, (model.example(),), "kernel_size", lowering=lowering)
        assert site.lowering == ""


def test_refused_site_reported_in_report_and_dict():
    model = refused.Hooked()
    result = fxfuse.fuse(model, (model.example(),), lowering="grouped", benchmark=False)
    assert "left alone" in result.report() and "forward hooks" in result.report()
    site = result.to_dict()["sites"][0]
    assert site["fused"] is False and "forward hooks" in site["reason"]


def test_hook_still_runs_after_fuse():
    model = refused.Hooked()
    x = model.example()
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    calls = []
    result.model.get_submodule("layers.1").register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(result.model(x), model(x))
    assert len(calls) == 1


def test_refused_site_next_to_a_fused_one():
    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.good, self.bad = spellings.Seed(padding=1), refused.KernelSizes()

        def forward(self, x):
            return self.good(x) + self.bad(x)

    model = Both()
    result = check(model, (model.good.example(),), expect_fused=1, expect_left=1)
    left = next(s for s in result.sites if not s.fused)
    assert "kernel_size" in left.reason and left.targets[0].startswith("bad.")


@pytest.mark.parametrize("make", [whole.DenseSkip, whole.CatOfSites], ids=["dense-skip-cat",
                                                                   "cat-of-two-loops"])
def test_no_spurious_site(make):
    """A cat that joins whole results or one conv branch is not reported as a loop."""
    model = make()
    sites = 2 if make is whole.CatOfSites else 0
    result = check(model, (torch.randn(2, *model.in_shape),), expect_fused=sites)
    assert len(result.sites) == sites


def test_loop_module_called_twice_shares_one_fused_conv():
    """Not a refusal any more: both loops call one fused conv, so no weight is untied."""
    model = whole.CalledTwice()
    result = fxfuse.fuse(model, (torch.randn(2, *model.in_shape),), lowering="grouped",
                         benchmark=False)
    assert [s.lowering for s in result.sites] == ["grouped", "grouped"]
    calls = [str(n.target) for n in result.model.graph.nodes if n.op == "call_module"]
    assert len(calls) == 2 and len(set(calls)) == 1
    x = torch.randn(5, *model.in_shape)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_tied_rows_stay_tied_after_a_step():
    """With the tie detected nothing is fused, so one optimiser step changes both rows'
    weight together, as in the original."""
    torch.manual_seed(0)
    model = refused.TiedRows()
    result = fxfuse.fuse(model, (model.example(),), benchmark=False, check_grads=False)
    assert not result.changed
    fused = result.model
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(model.example()).sum().backward()
    opt.step()
    assert fused.get_submodule("layers.1").weight is fused.get_submodule("layers.0").weight


def test_rows_sharing_weight_storage_are_found_tied():
    """Views of one tensor under different names: the matcher compares storage, not names.
    (``fuse`` deep-copies first; the matcher is run on the model itself here.)"""
    model = refused.StorageTiedRows()
    gm = fxfuse.trace_model(model, (model.example(),))
    site, = fxfuse.find_row_sites(gm)
    assert "layers.2.weight is tied to layers.1.weight" in site.reason
