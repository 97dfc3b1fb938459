"""Memory: fuse copies the model's parameters once (the copy it rewrites); every check,
cut-out and timing copy shares them (modules and buffers copied, parameters not), and
the gradient check takes gradients with ``torch.autograd.grad``, so nothing is written
to any parameter's ``.grad``. Counted, not timed: every deep copy of a parameter is seen.
Peak RSS against parameter bytes is recorded by ``benchmarks/peak_memory.py``.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import fxfuse


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(3))
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(torch.stack([h(x[:, i]) for i, h in enumerate(self.heads)], 1))


@pytest.fixture
def param_copies(monkeypatch):
    """How often each parameter (by id) of any model is deep-copied."""
    seen: collections.Counter = collections.Counter()
    original = nn.Parameter.__deepcopy__

    def counted(self, memo):
        seen[id(self)] += 1
        return original(self, memo)

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", counted)
    return seen


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fuse_copies_each_parameter_once(param_copies, train, monkeypatch):
    from helpers import rewrites_win
    rewrites_win(monkeypatch)            # auto's cut-outs rewritten and timed (fake clock)
    model = Heads().train(train)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)   # a user's gradient, left as it was
    result = fxfuse.fuse(model, torch.randn(4, 3, 16))
    assert result.changed and result.verification is not None
    assert result.timing is not None                      # the default path times too
    counts = [param_copies[id(p)] for p in model.parameters()]
    assert counts == [1] * len(counts), counts
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    assert not any(p.grad is not None for p in result.model.parameters())


def test_gradient_check_still_refuses_a_wrong_gradient():
    """The gradients compared are real: a fused model whose backward differs is refused."""
    from fxfuse.check.verify import verify_models

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y + (y - y.detach()) * 0.5     # same outputs, gradients 1.5x

    model = Heads().train()
    with pytest.raises(fxfuse.VerificationError, match="grad"):
        verify_models(model, Scaled(model), (torch.randn(4, 3, 16),),
                      weight_map=fxfuse.WeightMap(
                          tuple(fxfuse.WeightEntry(f"inner.{k}", (k,))
                                for k, _ in model.named_parameters())))
