"""Every spelling of the loop fuses into one convolution and computes the same numbers."""
from __future__ import annotations

import pytest
import torch

from zoo import spellings, refused, whole
from conftest import check, leaves

SPELLINGS = {
    "seed-append-unsqueeze-cat": lambda: spellings.Seed(),
    "stack-dim0": lambda: spellings.Stack(dim=0),
    "stack-dim1": lambda: spellings.Stack(dim=1),
    "stack-dim2": lambda: spellings.Stack(dim=2),
    "stack-dim3": lambda: spellings.Stack(dim=3),
    "stack-dim-1": lambda: spellings.Stack(dim=-1),
    "stack-dim-3": lambda: spellings.Stack(dim=-3),
    "cat-channels-no-unsqueeze": lambda: spellings.CatNoUnsqueeze(dim=1),
    "cat-length-no-unsqueeze": lambda: spellings.CatNoUnsqueeze(dim=-1),
    "rows-BCHW-dim2": lambda: spellings.SelectDim("BCHW", 2),
    "rows-BCHW-dim-2": lambda: spellings.SelectDim("BCHW", -2),
    "rows-BHCW-dim1": lambda: spellings.SelectDim("BHCW", 1),
    "rows-BHCW-dim-3": lambda: spellings.SelectDim("BHCW", -3),
    "rows-BCWH-dim3": lambda: spellings.SelectDim("BCWH", 3),
    "rows-BCWH-dim-1": lambda: spellings.SelectDim("BCWH", -1),
    "rows-BWHC-dim2-transposed": lambda: spellings.SelectDim("BWHC", 2),
    "rows-BHWC-dim1-transposed": lambda: spellings.SelectDim("BHWC", 1),
    "getitem-x[:,:,h]": lambda: spellings.Getitem(),
    "getitem-x[...,h,:]": lambda: spellings.GetitemEllipsis(),
    "getitem-negative-index": lambda: spellings.GetitemNegative(),
    "unbind": lambda: spellings.Unbind(),
    "split-squeeze": lambda: spellings.SplitSqueeze(),
    "chunk-squeeze": lambda: spellings.ChunkSqueeze(),
    "narrow-squeeze": lambda: spellings.Narrow(),
    "keepdim-slice-squeeze": lambda: spellings.KeepDimSlice(),
    "reversed-rows": lambda: spellings.Reversed(),
    "channel-one-rows-x[:,h].unsqueeze(1)": lambda: spellings.ChannelOneRows(),
    "channel-one-slices-x[:,h:h+1]": lambda: spellings.ChannelOneSlices(),
    "channel-chunks-hand-grouped": lambda: spellings.ChannelChunks(),
    "module-dict": lambda: spellings.ModuleDictRows(),
    "attributes": lambda: spellings.Attributes(),
    "nested-blocks": lambda: spellings.NestedBlocks(),
    "enumerate": lambda: spellings.Enumerate(),
    "zip-unbind": lambda: spellings.ZipUnbind(),
    "zip-range": lambda: spellings.ZipRange(),
    "functional-parameterlist": lambda: spellings.Functional(padding=1),
    "buffer-write-shape-bound": lambda: spellings.BufferWrite(),
    "cat-shape-bound": lambda: spellings.ShapeBound(),
    "buffer-select-copy_": lambda: whole.BufferCopy(),
    "strided-rows-x[:,:,2h]": lambda: whole.StridedRows(),
    "permuted-computed-source": lambda: whole.PermutedSource(),
    "per-row-relu-after-conv": lambda: refused.PerRowOp("relu"),
    "torch.select-concatenate-axis": lambda: spellings.FunctionForms("select"),
    "torch.unbind-cat-tensors-kw": lambda: spellings.FunctionForms("unbind"),
    "torch.narrow-squeeze-dim-kw": lambda: spellings.FunctionForms("narrow"),
    "tensor_split-concat": lambda: spellings.TensorSplitRows(),
    "transposed-rows-BWHC": lambda: spellings.TransposedRows(),
}


@pytest.mark.parametrize("make", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_spelling_fuses(make):
    model = make()
    result = check(model, (model.example(),), expect_fused=1)
    assert result.sites[0].rows == model.H


@pytest.mark.parametrize("make,tracer", [
    (spellings.BufferWrite, "export"), (spellings.ShapeBound, "export"), (spellings.Seed, "symbolic"),
], ids=["buffer-write", "shape-bound", "seed"])
def test_tracer_used(make, tracer):
    model = make()
    assert check(model, (model.example(),), 1).tracer == tracer


@pytest.mark.parametrize("make", [spellings.Seed, spellings.Stack, spellings.Functional], ids=["seed", "stack",
                                                                       "functional"])
def test_export_tracer(make):
    model = make(padding=1) if make is spellings.Functional else make()
    assert check(model, (model.example(),), 1, tracer="export").tracer == "export"


# ------------------------------------------------------------------ whole models

WHOLE = {
    "two-sites": (whole.TwoSites, 2),
    "chained-sites": (whole.Chained, 2),
    "poster-net-joint-conv2d-plus-loop": (whole.PosterNet, 1),
    "row-export": (whole.RowExport, 1),
    "site-on-a-row-export": (whole.SiteOnRowExport, 2),
    "cat-of-two-loops": (whole.CatOfSites, 2),
}


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
@pytest.mark.parametrize("lowering", ["grouped", "grouped2d"])
@pytest.mark.parametrize("make,sites", WHOLE.values(), ids=WHOLE.keys())
def test_whole_model(make, sites, lowering, tracer):
    model = make()
    check(model, (torch.randn(2, *model.in_shape),), expect_fused=sites, lowering=lowering,
          tracer=tracer)


def test_row_export_kept_as_a_slice():
    model = whole.RowExport()
    result = check(model, (model.example(),), 1)
    assert result.sites[0].row_exports == (result.sites[0].convs[1],)


def test_poster_net_keeps_joint_conv():
    model = whole.PosterNet()
    result = check(model, (torch.randn(2, *model.in_shape),), 1)
    calls = [n.target for n in result.model.graph.nodes if n.op == "call_module"]
    assert "joint" in calls and "head" in calls


@pytest.mark.parametrize("make", [spellings.BufferWrite, spellings.ShapeBound, spellings.Seed],
                         ids=["buffer-write", "shape-bound", "seed"])
def test_traced_with_batch_one(make):
    """Export specialises a size-1 batch; the fused model must still take any batch."""
    model = make()
    check(model, (model.example(1),), 1)


@pytest.mark.parametrize("dim", [0, 1, -1], ids=["batch", "channels", "length"])
def test_traced_with_batch_one_cat(dim):
    """With one sample, ``cat(dim=0)`` looks like a plain flatten; another batch must not."""
    model = spellings.CatNoUnsqueeze(dim=dim)
    check(model, (model.example(1),), 1)


def test_every_dim_size_one():
    model = spellings.Stack(dim=0, H=2, C=1, C_out=1, k=1, W=1)
    check(model, (model.example(1),), 1)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_export_padding_mode(mode):
    """torch.export turns padding_mode into a per-row ``aten.pad`` before the conv."""
    model = spellings.Seed(padding=1, padding_mode=mode)
    result = check(model, (model.example(),), 1, tracer="export")
    assert "pad" in result.sites[0].steps


def test_two_inputs():
    model = whole.TwoInputs()
    bias = torch.randn(2, model.C_out, model.H, model.W_out)
    check(model, (model.example(), bias), 1)


@pytest.mark.parametrize("make", [whole.Shared, whole.SharedFunctional, whole.SharedUsedOutside],
                         ids=["module", "functional", "also-used-outside"])
def test_shared_module_is_batched(make):
    model = make()
    result = check(model, (model.example(),), 1)
    site = result.sites[0]
    assert site.shared_module and site.lowering == "batched"
    assert not result.weight_map.entries
    x = model.example(3)
    for got, ref in zip(leaves(result.model(x)), leaves(model(x)), strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kernels,groups", [
    ((3, 3, 5, 5), ((0, 1), (2, 3))),
    ((3, 5, 3, 5, 3), ((0, 2, 4), (1, 3))),
    ((3, 3, 3, 5), ((0, 1, 2), (3,))),
], ids=["two-pairs", "interleaved", "one-odd-row"])
def test_mixed_kernel_sizes_fused_in_groups(kernels, groups):
    model = refused.KernelSizes(kernels)
    result = check(model, (model.example(),), 1)
    assert result.sites[0].groups == groups


# ------------------------------------------------------------------ conv settings x dtype

SETTINGS = {
    "stride2": dict(stride=2),
    "padding1": dict(padding=1),
    "padding-same": dict(padding="same"),
    "padding-valid": dict(padding="valid"),
    "dilation2": dict(dilation=2, padding=2),
    "depthwise-groups=C": dict(C=4, C_out=8, groups=4),
    "groups2": dict(C=4, C_out=6, groups=2),
    "no-bias": dict(bias=False),
    "k1": dict(k=1),
    "even-kernel-same": dict(k=4, padding="same"),
    "even-kernel-same-dilation2": dict(k=4, padding="same", dilation=2),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "replicate": dict(padding=2, padding_mode="replicate"),
    "circular": dict(padding=1, padding_mode="circular"),
    "zeros-mode": dict(padding=1, padding_mode="zeros"),
    "everything": dict(C=4, C_out=4, k=5, stride=2, padding=3, dilation=2, groups=2,
                       bias=False, padding_mode="reflect"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_conv_settings(settings, dtype):
    model = spellings.Seed(**settings).to(dtype)
    result = check(model, (model.example(dtype=dtype),), 1)
    spec = result.sites[0].spec
    assert spec.dtype == dtype
    assert spec.padding_mode == settings.get("padding_mode", "zeros")


@pytest.mark.parametrize("settings", ["stride2", "padding-same", "dilation2",
                                      "depthwise-groups=C", "no-bias", "reflect", "circular",
                                      "everything"])
def test_conv_settings_grouped2d(settings):
    model = spellings.Seed(**SETTINGS[settings])
    result = check(model, (model.example(),), 1, lowering="grouped2d")
    assert result.sites[0].lowering == "grouped2d"


@pytest.mark.parametrize("settings", ["padding1", "everything"])
def test_conv_settings_functional(settings):
    kw = {k: v for k, v in SETTINGS[settings].items() if k != "padding_mode"}
    model = spellings.Functional(**kw)
    check(model, (model.example(),), 1)


@pytest.mark.parametrize("lowering", ["grouped", "grouped2d", "auto"])
@pytest.mark.parametrize("H", [2, 1024], ids=["H2", "H1024"])
def test_rows_count(H, lowering):
    if H == 1024 and lowering == "auto":
        pytest.skip("timing 1024 rows is slow; auto is covered with few rows")
    model = spellings.Stack(H=H, C=2, C_out=2, W=4, padding=1)
    result = check(model, (model.example(),), 1, lowering=lowering)
    assert result.sites[0].rows == H


@pytest.mark.parametrize("make", [spellings.Seed, whole.Shared, spellings.ChannelChunks],
                         ids=["seed", "shared", "channel-chunks"])
def test_auto_lowering(make):
    model = make()
    result = check(model, (model.example(),), 1, lowering="auto")
    site = result.sites[0]
    assert site.lowering in ("grouped", "grouped2d", "im2col", "batched", "loop")
    assert site.timings and dict(site.timings)["loop"] > 0


def test_frozen_rows_stay_frozen():
    model = spellings.Frozen()
    result = check(model, (model.example(),), 1)
    assert not any(p.requires_grad for p in result.model.parameters())


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64],
                         ids=[*DTYPES.keys(), "float64"])
@pytest.mark.parametrize("make", [spellings.BufferWrite, spellings.ChannelChunks, spellings.Functional, whole.Shared],
                         ids=["buffer-write", "channel-chunks", "functional", "shared"])
def test_dtype_across_spellings(make, dtype):
    model = make().to(dtype)
    check(model, (model.example(dtype=dtype),), 1)


def test_escaping_row_does_not_alias_the_fused_result():
    """``(stack(outs, 1), outs[0])``: the row returned on its own is its own tensor, so an
    in-place change to one output leaves the other as the original does."""
    torch.manual_seed(0)
    model = spellings.EscapingRow()
    x = model.example()
    result = check(model, (x,), 1)
    stacked, row = result.model(x)
    before = stacked.clone()
    row.add_(1.0)
    torch.testing.assert_close(stacked, before, rtol=0, atol=0)
    ref_stacked, ref_row = model(x)
    ref_row.add_(1.0)
    torch.testing.assert_close(row, ref_row, rtol=1e-5, atol=1e-5)
