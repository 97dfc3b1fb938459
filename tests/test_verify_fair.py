"""Verification refuses only real differences: random draws the original cannot switch
off (``nn.MultiheadAttention(dropout=...)``) are compared from one seed or skipped with a
note; parameters reachable under two names are matched by identity; and a forward that
depends on the batch size's parity is caught (odd and even batches are checked)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.check.verify import verify_models

TRACERS = ["symbolic", "export"]


def _rows(x, layers):
    return torch.stack([layers[h](x[:, :, h, :]) for h in range(len(layers))], 2)


class AttentionDropout(nn.Module):
    """A per-row loop, then attention whose dropout is inside MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(8, 8, 3, padding=1) for _ in range(4))
        self.attn = nn.MultiheadAttention(12, 2, dropout=0.1, batch_first=True)

    def forward(self, x):
        z = _rows(x, self.layers).flatten(1, 2)
        return self.attn(z, z, z)[0]


class AliasedHead(nn.Module):
    """The head module under two attribute names."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(8, 8, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(12, 5)
        self.alias = self.head

    def forward(self, x):
        return self.alias(_rows(x, self.layers))


class RepeatedBlock(nn.Module):
    """``nn.ModuleList([layer] * 3)``: one Linear under three names."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(8, 8, 3, padding=1) for _ in range(4))
        self.blocks = nn.ModuleList([nn.Linear(12, 12)] * 3)

    def forward(self, x):
        y = _rows(x, self.layers)
        for block in self.blocks:
            y = block(y)
        return y


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_dropout_is_not_a_false_refusal(tracer, mode):
    torch.manual_seed(0)
    model = AttentionDropout().train(mode == "train")
    x = torch.randn(3, 8, 4, 12)
    result = fxfuse.fuse(model, x, lowering="grouped", benchmark=False, tracer=tracer)
    assert result.changed
    notes = " ".join(result.verification.skipped)
    assert "random numbers" in notes and "cannot be switched off" in notes, notes
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("make", [AliasedHead, RepeatedBlock])
def test_parameters_under_two_names_are_matched_by_identity(make, tracer):
    torch.manual_seed(0)
    model = make().train()
    result = fxfuse.fuse(model, torch.randn(3, 8, 4, 12), lowering="grouped",
                         benchmark=False, tracer=tracer)
    assert result.changed
    assert any("param grads" in c.name for c in result.verification.checks)


class EvenBatchesDiffer(nn.Module):
    """Stands in for a rewrite that is right on odd batches only."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, x):
        y = self.original(x)
        return y + 1 if x.shape[0] % 2 == 0 else y


def test_a_forward_wrong_on_even_batches_is_caught():
    torch.manual_seed(0)
    original = AliasedHead().eval()
    x = torch.randn(3, 8, 4, 12)                  # traced at an odd batch
    with pytest.raises(fxfuse.VerificationError, match="batch 8"):
        verify_models(original, EvenBatchesDiffer(original), (x,), check_grads=False)


def test_odd_and_even_batches_are_checked():
    torch.manual_seed(0)
    model = AliasedHead().eval()
    result = fxfuse.fuse(model, torch.randn(3, 8, 4, 12), lowering="grouped", benchmark=False)
    sizes = set(result.verification.batch_sizes) - {3, 1}
    assert {b % 2 for b in sizes} == {0, 1}, result.verification.batch_sizes
