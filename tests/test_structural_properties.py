"""Property tests of the structural fusion: generated row models (a random chain of
ordinary ops per row, read and joined in random spellings) fuse under ``vmap``, are exact
at another batch size, keep gradients and map their weights both ways; the default path
returns an exact model whatever it chose."""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fxfuse
from zoo.rowgen import JOINS, POOLS, READS, SIZED_FAMILIES, WIDTH_JOINS, RowModel

LAYERS = {"vec": ["linear", "linear_nobias", "glu", "gate", "layernorm", "rmsnorm",
                  "residual_mlp", "scale_shift", "sequential", "batchnorm1d"],
          "seq": ["conv1d", "conv1d_depthwise", "conv1d_same", "batchnorm1d", "groupnorm"],
          "img": ["conv2d", "batchnorm2d"],
          "tok": ["attention", "layernorm", "linear"],
          "idx": ["linear", "glu", "layernorm", "rmsnorm"]}


@st.composite
def row_models(draw):
    """A generated model: family, a chain that starts with a layer, rows, read, join."""
    family = draw(st.sampled_from(sorted(POOLS)))
    first = draw(st.sampled_from(LAYERS[family]))
    rest = draw(st.lists(st.sampled_from(sorted(POOLS[family])), max_size=2))
    rows = draw(st.integers(2, 4))
    read = draw(st.sampled_from(READS))
    join = draw(st.sampled_from(JOINS))
    train = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = RowModel(family, [first, *rest], rows, read, join).train(train)
    return model


@st.composite
def sized_row_models(draw):
    """A generated model whose rows differ in one size: each row's embedding table
    (``idx``) or last Linear's width (``vec``, ``tok``)."""
    family = draw(st.sampled_from(SIZED_FAMILIES))
    first = draw(st.sampled_from(LAYERS[family]))
    rows = draw(st.integers(2, 4))
    sizes = tuple(draw(st.lists(st.integers(2, 12), min_size=rows, max_size=rows)))
    read = draw(st.sampled_from(READS))
    join = draw(st.sampled_from(JOINS if family == "idx" else WIDTH_JOINS))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return RowModel(family, [first], rows, read, join, sizes).train(draw(st.booleans()))


def _outputs(out):
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(row_models())
def test_generated_rows_fuse_under_vmap(model):
    x = model.example()
    reference = copy.deepcopy(model)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    fused = [s for s in result.sites if s.fused]
    assert sum(s.rows for s in fused) == model.n, [s.reason for s in result.sites]
    assert all(s.lowering == "vmap" for s in fused)
    assert not [n for n in result.model.graph.nodes
                if n.op == "call_module" and str(n.target).startswith("rows.")], \
        result.model.code
    other = model.example(batch=x.shape[0] + 3)
    with torch.no_grad():
        want = _outputs(copy.deepcopy(reference)(other))
        got = _outputs(copy.deepcopy(result.model)(other))   # train mode moves statistics
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    _round_trip(result, reference)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(sized_row_models())
def test_generated_rows_of_different_sizes_fuse_as_one_loop(model):
    x = model.example()
    reference = copy.deepcopy(model)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    assert [s.rows for s in result.sites if s.fused] == [model.n], \
        [s.reason for s in result.sites]
    other = model.example(batch=x.shape[0] + 3)
    with torch.no_grad():
        want = _outputs(copy.deepcopy(reference)(other))
        got = _outputs(copy.deepcopy(result.model)(other))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    _round_trip(result, reference)


def _round_trip(result, model) -> None:
    """The weight map moves the checkpoint both ways, bit for bit."""
    wm = result.weight_map
    fused_sd = wm.to_fused(model.state_dict())
    model_sd = result.model.state_dict()
    assert fused_sd.keys() == model_sd.keys()
    for key, value in model_sd.items():
        assert torch.equal(fused_sd[key], value), key
    back = wm.to_original(model_sd)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(row_models())
def test_generated_rows_default_path_is_exact(model):
    """``fuse(model, inputs)`` as a user calls it: whatever ``auto`` chose, the model it
    returns computes what the original does (verification ran and passed)."""
    x = model.example()
    reference = copy.deepcopy(model)
    result = fxfuse.fuse(model, (x,), benchmark=False, auto_rounds=2)
    assert result.verification is not None or not result.changed
    other = model.example(batch=x.shape[0] + 1)
    with torch.no_grad():
        for w, g in zip(_outputs(reference(other)),
                        _outputs(copy.deepcopy(result.model)(other))):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
