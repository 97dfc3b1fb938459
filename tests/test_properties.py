"""Property-based tests: random loop models fuse into one conv and compute the same numbers
on another batch size than the one traced with."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo import spellings, generated, refused
from conftest import check

SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_settings(draw) -> dict:
    """Conv1d settings that fit an input of length ``W`` (also drawn)."""
    C = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([1, C]))
    C_out = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else ["valid"])))
    pad = 0 if isinstance(padding, str) else padding
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])) \
        if pad else "zeros"
    span = dilation * (k - 1) + 1
    W = draw(st.integers(max(span - 2 * pad, pad + 1, 1), max(span - 2 * pad, pad + 1, 1) + 4))
    return dict(C=C, C_out=C_out, k=k, stride=stride, dilation=dilation, padding=padding,
                padding_mode=mode, groups=groups, bias=draw(st.booleans()), W=W)


@st.composite
def joins(draw) -> tuple[str, int]:
    kind = draw(st.sampled_from(["stack", "unsqueeze-cat", "cat", "buffer"]))
    if kind == "cat":
        return kind, draw(st.sampled_from([1, -1, 2, -2, 0]))
    if kind == "buffer":
        return kind, draw(st.integers(1, 3))
    return kind, draw(st.integers(-4, 3))


@st.composite
def row_orders(draw, H: int) -> tuple[int, ...]:
    """Which source row each of ``H`` convs reads: in order, shuffled, or some skipped."""
    kind = draw(st.sampled_from(["in-order", "shuffled", "subset"]))
    if kind == "in-order":
        return tuple(range(H))
    if kind == "shuffled":
        return tuple(draw(st.permutations(range(H))))
    return tuple(sorted(draw(st.lists(st.integers(0, H + 2), min_size=H, max_size=H,
                                      unique=True))))


batches = st.tuples(st.integers(1, 3), st.integers(1, 4)).filter(lambda b: b[0] != b[1])


@SETTINGS
@given(data=st.data(), H=st.integers(2, 6), conv=conv_settings(),
       layout=st.sampled_from(["BCHW", "BHCW", "BCWH"]), negative=st.booleans(),
       read=st.sampled_from(["select", "unbind", "split", "narrow"]), join=joins(),
       lowering=st.sampled_from(["grouped", "grouped2d"]), batch=batches,
       tracer=st.sampled_from(["symbolic", "export"]))
def test_random_loop_fuses(data, H, conv, layout, negative, read, join, lowering, batch,
                           tracer):
    # export turns a padding mode into a per-row pad op (see test_export_padding_mode)
    order = data.draw(row_orders(H))
    model = generated.Generated(layout, negative, read, join, order, H=H, **conv)
    traced, other = batch
    result = check(model, (model.example(traced),), 1, lowering=lowering, batch=other,
                   tracer=tracer)
    assert result.tracer == tracer
    site = result.sites[0]
    assert site.rows == H and site.spec.kernel_size == conv["k"]


@SETTINGS
@given(G=st.integers(2, 5), C=st.integers(1, 3), C_out=st.integers(1, 3),
       k=st.integers(1, 3), bias=st.booleans(), W=st.integers(3, 7), batch=batches,
       shared=st.booleans())
def test_random_channel_chunks_fuse(G, C, C_out, k, bias, W, batch, shared):
    model = spellings.ChannelChunks(H=G, C=C, C_out=C_out, k=k, W=W, bias=bias)
    if shared:
        for g in range(1, G):
            model.layers[g] = model.layers[0]
    traced, other = batch
    result = check(model, (torch.randn(traced, G * C, W),), 1, batch=other)
    assert result.sites[0].shared_module == shared


@SETTINGS
@given(kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=2, max_size=6),
       batch=batches)
def test_random_mixed_kernels(kernels, batch):
    """Rows with differing kernel sizes: fused in groups when some rows agree, else left."""
    model = refused.KernelSizes(tuple(kernels))
    traced, other = batch
    distinct = len(set(kernels))
    fused = distinct < len(kernels)
    result = check(model, (model.example(traced),), int(fused), int(not fused), batch=other)
    if fused:
        assert len(result.sites[0].groups) == distinct
