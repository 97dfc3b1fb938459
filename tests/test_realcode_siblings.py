"""Sibling Linear layers on one input (q/k/v projections, mu/logvar heads) fuse into one
Linear with concatenated output features; each user reads its slice."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fxfuse
from helpers import assert_same
from zoo.realcode import PairedLinear


class Heads(nn.Module):
    """A VAE encoder: a hidden state, then mu and logvar heads; dict output."""

    def __init__(self, d=6, h=10, z=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.ReLU())
        self.mu = nn.Linear(h, z)
        self.logvar = nn.Linear(h, z)

    def forward(self, x):
        h = self.body(x)
        mu = self.mu(h)
        logvar = self.logvar(h)
        return {"mu": mu, "std": torch.exp(0.5 * logvar), "kl": (mu ** 2 + logvar.exp()).sum(-1)}


class DictProjections(nn.Module):
    """Three projections without bias held in a ModuleDict; one of them is F.linear with
    a raw parameter."""

    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.ModuleDict({n: nn.Linear(d, d, bias=False) for n in ("q", "k", "v")})
        self.gate = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        p = {n: m(x) for n, m in self.proj.items()}
        g = torch.sigmoid(F.linear(x, self.gate))
        att = torch.softmax(p["q"] @ p["k"].transpose(-1, -2), -1)
        return g * (att @ p["v"])


MODELS = [(PairedLinear, lambda b: torch.randn(b, 5, 8), 3),
          (Heads, lambda b: torch.randn(b, 6), 2),
          (DictProjections, lambda b: torch.randn(b, 5, 8), 4)]


def _linears(gm) -> int:
    return sum(isinstance(gm.get_submodule(str(n.target)), nn.Linear)
               for n in gm.graph.nodes if n.op == "call_module") + \
        sum(n.target is F.linear for n in gm.graph.nodes if n.op == "call_function")


def _leaves(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("lowering", [None, "grouped"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("factory,make,rows", MODELS)
def test_siblings_fuse(factory, make, rows, train, lowering):
    torch.manual_seed(0)
    model = factory().train(train)
    opts = {} if lowering is None else {"lowering": lowering}
    result = fxfuse.fuse(model, (make(4),), benchmark=False, auto_rounds=3, **opts)
    sites = [s for s in result.sites if s.loop_kind == "siblings"]
    assert len(sites) == 1 and sites[0].rows == rows
    assert "siblings" in result.report()
    site = sites[0]
    if lowering is None and site.lowering == "loop":
        assert site.timings                     # auto timed it and kept the Linears
        return
    assert site.lowering == "siblings"
    before = _linears(fxfuse.trace_model(copy.deepcopy(model), (make(4),)))
    fused = [m for n, m in result.model.named_modules() if n.endswith("_siblings")]
    assert len(fused) == 1 and type(fused[0]) is nn.Linear
    assert fused[0].in_features == (10 if factory is Heads else 8)
    assert _linears(result.model) == before - rows + 1
    x = make(7)                                  # another batch size
    ref, new = copy.deepcopy(model).eval(), copy.deepcopy(result.model).eval()
    for a, b in zip(_leaves(ref(x)), _leaves(new(x))):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if factory is not Heads:
        assert_same(model, result, make(3), train)


def test_heads_gradients_map_back():
    torch.manual_seed(1)
    model = Heads().train()
    result = fxfuse.fuse(model, (torch.randn(4, 6),), lowering="grouped", benchmark=False)
    x = torch.randn(5, 6)
    ref, new = copy.deepcopy(model), copy.deepcopy(result.model)
    for m in (ref, new):
        out = m(x)
        (out["mu"].sum() + out["std"].pow(2).sum() + out["kl"].sum()).backward()
    grads = result.weight_map.to_original({k: p.grad for k, p in new.named_parameters()},
                                          strict=False)
    for key, p in ref.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, rtol=1e-5, atol=1e-6)


def test_weight_map_round_trip():
    torch.manual_seed(2)
    model = DictProjections()
    result = fxfuse.fuse(model, (torch.randn(2, 5, 8),), lowering="grouped", benchmark=False)
    wm, fused_sd = result.weight_map, result.model.state_dict()
    keys = {p for e in wm.entries for p in e.parts}
    assert {"proj.q.weight", "proj.k.weight", "proj.v.weight", "gate"} <= keys
    original = wm.to_original(fused_sd)
    for key, value in model.state_dict().items():
        assert torch.equal(original[key], value), key
    again = wm.to_fused(original)
    for key, value in fused_sd.items():
        assert torch.equal(again[key], value), key
    fresh = DictProjections()
    fresh.load_state_dict(wm.to_original(fused_sd))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


class Mixed(nn.Module):
    """Linears on one input that must not fuse: other in_features, bias vs none, tied."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4, bias=False)     # no bias, unlike a
        self.c = nn.Linear(6, 4)                 # reads another tensor
        self.d = nn.Linear(8, 4)
        self.e = nn.Linear(8, 4)
        self.e.weight = self.d.weight            # tied with d

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x[:, :6]) + self.d(x) * self.e(x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) * self.b(x) + self.a(x.flip(-1))


class WeightReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = self.a(x) * self.b(x) @ self.b.weight        # b's weight used directly too
        return y + F.linear(x, self.w) * F.linear(x, self.w, None)   # w read twice


@pytest.mark.parametrize("factory", [Mixed, CalledTwice, WeightReadElsewhere])
def test_left_alone(factory):
    torch.manual_seed(3)
    model = factory()
    x = torch.randn(3, 8)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    assert not any(s.loop_kind == "siblings" for s in result.sites)
    assert not result.changed
    torch.testing.assert_close(result.model(x), model(x))


def test_min_rows_respected():
    model = PairedLinear()
    result = fxfuse.fuse(model, (torch.randn(2, 5, 8),), lowering="grouped", min_rows=4,
                         benchmark=False)
    assert not result.changed and not result.sites


def test_inspect_lists_siblings(tmp_path):
    from fxfuse.match.find import find_row_sites
    from fxfuse.match.siblings import with_siblings
    gm = torch.fx.symbolic_trace(Heads())
    sites = with_siblings(gm, find_row_sites(gm))
    assert [s.targets for s in sites] == [("mu", "logvar")]
    assert sites[0].to_dict()["loop_kind"] == "siblings"
