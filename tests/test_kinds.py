"""Row-op kinds added through the kind interface: LayerNorm and GroupNorm rows.

Each fuses through the default path, in eval and train mode, and the fused model agrees
with the original in outputs, gradients (mapped back through the weight map) and state.
"""
from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.match.kinds import REGISTRY
from helpers import assert_same, call_sequence, fuse
from zoo import norms

CASES = [
    # (id, factory, input shape, layer-norm-like step in the fused graph)
    ("layernorm-heads", norms.LayerNormHeads, (5, 4, 12), "layer_norm"),
    ("layernorm-heads-no-bias", lambda: norms.LayerNormHeads(bias=False), (5, 4, 12),
     "layer_norm"),
    ("layernorm-tower", norms.LayerNormTower, (4, 3, 3, 16), "layer_norm"),
    ("functional-layernorm", norms.FunctionalLayerNorm, (4, 3, 10), "layer_norm"),
    ("groupnorm-tower", norms.GroupNormTower, (4, 3, 4, 16), "GroupNorm"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,step", CASES, ids=[c[0] for c in CASES])
def test_norm_rows_fuse_exactly(name, factory, shape, step, train):
    torch.manual_seed(0)
    model = factory().train(train)
    x = torch.randn(*shape)
    result = fxfuse.fuse(model, (x,), benchmark=False)      # the default path: auto
    assert len(result.sites) == 1 and result.sites[0].fusable, result.sites[0].reason
    forced = fuse(model, x)
    site = forced.sites[0]
    assert site.fused, site.reason
    assert any(s.split()[0] in ("layernorm", "groupnorm") for s in site.steps)
    sequence = call_sequence(forced.model)
    assert sequence.count(step) == 1, sequence       # one norm for all rows
    assert "LayerNorm" not in sequence                # no per-row module left
    assert_same(model, forced, torch.randn(shape[0] + 2, *shape[1:]), train)


def test_layernorm_over_several_dims_is_not_a_row_op_but_is_vectorised():
    """No row-op kind covers a LayerNorm over two dims; by structure the rows are the same
    code, so ``vmap`` fuses them exactly."""
    model = norms.MultiDimLayerNorm()
    result = fuse(model, torch.randn(2, 3, 3, 16), lowering="vmap")
    assert [s.lowering for s in result.sites] == ["vmap"]
    x = torch.randn(5, 3, 3, 16)
    torch.testing.assert_close(result.model(x), model(x))


def test_every_kind_is_registered_once_with_its_interface():
    assert {"conv", "linear", "batchnorm", "layernorm", "groupnorm", "pad",
            "pointwise"} <= set(REGISTRY)
    for name, kind in REGISTRY.items():
        assert kind.name == name and kind.title and kind.families


@pytest.mark.parametrize("factory,shape", [(norms.LayerNormTower, (4, 3, 3, 16)),
                                           (norms.GroupNormTower, (4, 3, 4, 16))],
                         ids=["layernorm", "groupnorm"])
def test_exported_norm_rows_fuse(factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False, tracer="export")
    assert [s.fused for s in result.sites] == [True], [s.reason for s in result.sites]
    other = torch.randn(shape[0] + 1, *shape[1:])
    torch.testing.assert_close(result.model(other), model(other), rtol=1e-4, atol=1e-5)
