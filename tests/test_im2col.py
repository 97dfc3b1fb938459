"""The ``im2col`` lowering: conv rows as unfold + one batched matmul, exact (outputs,
gradients, weight map both ways), timed by ``auto`` with the other lowerings, and refused
with one line where it does not apply (rows whose kernel sizes differ)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import RewriteError
from fxfuse.rewrite.rewriter import lowerings_for

from helpers import assert_same, call_sequence, rewrites_win


class Rows(nn.Module):
    """One ``Conv1d`` per row ``x[:, :, h, :]`` (settings given), stacked on dim 2."""

    def __init__(self, rows=4, c_in=6, c_out=4, kernels=None, **conv):
        super().__init__()
        kernels = kernels or (3,) * rows
        self.layers = nn.ModuleList(nn.Conv1d(c_in, c_out, k, **conv) for k in kernels)

    def forward(self, x):
        return torch.stack([layer(x[:, :, h, :]) for h, layer in enumerate(self.layers)], 2)


SETTINGS = {
    "plain": {},
    "padding": {"padding": 2},
    "stride": {"stride": 2, "padding": 1},
    "dilation": {"dilation": 3, "padding": 1},
    "no-bias": {"bias": False},
    "same": {"padding": "same", "dilation": 2},
    "valid": {"padding": "valid"},
    "groups": {"groups": 2, "padding": 1},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "circular": {"padding": 2, "padding_mode": "circular", "stride": 3},
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_im2col_is_exact_on_conv_rows(name, train):
    torch.manual_seed(0)
    model = Rows(**SETTINGS[name]).train(train)
    x = torch.randn(3, 6, 4, 17)
    result = fxfuse.fuse(model, (x,), lowering="im2col", benchmark=False)
    assert [s.lowering for s in result.sites] == ["im2col"]
    calls = call_sequence(result.model)
    assert calls.count("unfold") == 1 and calls.count("matmul") == 1
    assert "Conv1d" not in calls                   # the fused weights are read, not called
    assert_same(model, result, torch.randn(5, 6, 4, 17), train)   # another batch size
    # the weight map maps the fused weight back to each row's weight and bias
    back = result.weight_map.to_original(result.model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value)
    fused = result.weight_map.to_fused(model.state_dict())
    for key, value in result.model.state_dict().items():
        assert torch.equal(fused[key], value)


def test_im2col_is_refused_where_kernel_sizes_differ():
    """Rows with their own kernel sizes fuse through zero-padded kernels (grouped), not
    im2col: forced, one line says so and what to use; auto does not time it."""
    torch.manual_seed(0)
    model = Rows(rows=3).eval()
    model.layers = nn.ModuleList(nn.Conv1d(6, 4, k, padding=k // 2) for k in (3, 3, 5))
    x = torch.randn(2, 6, 3, 16)
    with pytest.raises(RewriteError) as info:
        fxfuse.fuse(model, (x,), lowering="im2col", benchmark=False)
    text = str(info.value)
    assert "kernel sizes differ" in text and "lowering='grouped'" in text
    assert "\n" not in text
    (site,) = fxfuse.find_row_sites(fxfuse.trace_model(model, (x,)))
    assert "im2col" not in lowerings_for(site)
    assert fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False).sites[0].fused


def test_auto_times_im2col_with_the_other_lowerings(monkeypatch):
    """Default path: im2col is one of the candidates timed (on a fake clock, where every
    rewrite costs the same, so the first listed is chosen); the result is exact."""
    rewrites_win(monkeypatch)
    torch.manual_seed(0)
    model = Rows(padding=1).eval()
    x = torch.randn(2, 6, 4, 12)
    result = fxfuse.fuse(model, (x,), benchmark=False)
    (site,) = result.sites
    assert [e["name"] for e in site.decision["estimates"]] == ["loop", "grouped", "grouped2d",
                                                                "im2col"]
    assert site.lowering == "grouped"
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
