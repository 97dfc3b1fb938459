"""Rows that are the same code but for one size (an embedding table's cardinality, a
head's output width): one loop over tensors zero-padded to the largest and sliced back,
when padding is exact; refused with the op that reads the padding when it is not."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import ConfigError
from fxfuse.weightmap import WeightMap
from helpers import assert_map_round_trip, vmap_wins

CARDS = (3, 7, 12)
WIDTHS = (3, 5, 2, 8)


class TabColumns(nn.Module):
    """TabTransformer-style: one embedding per categorical column, each with its own
    cardinality, beside the continuous columns, all in one cat."""

    def __init__(self, cards=CARDS, d: int = 4):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(c, d) for c in cards)

    def forward(self, cat, cont):
        parts = [e(cat[:, i]) for i, e in enumerate(self.embeds)]
        return torch.cat(parts + [cont], dim=1)


def tab_inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in CARDS], 1)
    return cat, torch.randn(batch, 2, generator=gen)


class Heads(nn.Module):
    """A Linear head per variable with ``categories[i]`` outputs, joined by cat."""

    def __init__(self, widths=WIDTHS, d: int = 16, tail=None):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, k), *(tail(k) if tail else ())) for k in widths)

    def forward(self, x):                       # (B, len(widths), d)
        return torch.cat([h(x[:, i]) for i, h in enumerate(self.heads)], dim=-1)


def norm_tail(k):
    return (nn.BatchNorm1d(k), nn.ReLU())


class SoftmaxHeads(Heads):
    def forward(self, x):
        return torch.cat([torch.softmax(h(x[:, i]), -1) for i, h in enumerate(self.heads)], -1)


def layernorm_tail(k):
    return (nn.LayerNorm(k),)


class CentredHeads(Heads):
    """Each head's outputs minus their sum: exact on zero padding (the padded outputs are
    zeros), but the sum's gradient reaches the padding, so training would fill it."""

    def forward(self, x):
        outs = []
        for i, h in enumerate(self.heads):
            y = h(x[:, i])
            outs.append(y - y.sum(-1, keepdim=True))
        return torch.cat(outs, -1)


def _fused(result):
    return [s for s in result.sites if s.fused]


def _grads(model, result, inputs):
    """Outputs, input and parameter gradients of one step agree, in the model's mode
    (fused parameters mapped back through the weight map)."""
    ref, new = copy.deepcopy(model), copy.deepcopy(result.model)
    outs = []
    leaves = []
    for m in (ref, new):
        args = tuple(x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs)
        leaves.append([a for a in args if a.requires_grad])
        outs.append(m(*args))
    torch.testing.assert_close(outs[1], outs[0])
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    for a, b in zip(*leaves):
        torch.testing.assert_close(b.grad, a.grad)
    grads = result.weight_map.to_original({k: p.grad for k, p in new.named_parameters()},
                                          strict=False)
    for key, p in ref.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, msg=key)


def test_embedding_columns_of_different_cardinalities_are_one_loop():
    torch.manual_seed(0)
    model = TabColumns().eval()
    result = fxfuse.fuse(model, tab_inputs(6), lowering="vmap", benchmark=False)
    (site,) = _fused(result)
    assert site.rows == 3 and site.lowering == "vmap"
    assert not [n for n in result.model.graph.nodes if n.op == "call_module"
                and isinstance(result.model.get_submodule(str(n.target)), nn.Embedding)]
    (table,) = [p for k, p in result.model.named_parameters() if k.startswith("fused_rows")]
    assert tuple(table.shape) == (3, max(CARDS), 4)
    other = tab_inputs(9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*other), model(*other))
    _grads(model, result, other)
    assert_map_round_trip(model, result)
    entry = next(e for e in result.weight_map.entries if e.window)
    assert entry.op == "stack" and entry.pad_dim == 0
    assert entry.window == tuple((0, c) for c in CARDS)


def test_embedding_columns_on_the_default_path(monkeypatch):
    """``fuse(model, inputs)``: exact whatever ``auto`` picked; on a fake clock where the
    fused rows are faster, the padded loop is the one rewritten."""
    torch.manual_seed(0)
    model = TabColumns().eval()
    other = tab_inputs(9, seed=1)
    plain = fxfuse.fuse(model, tab_inputs(6), benchmark=False, auto_rounds=2)
    with torch.no_grad():
        torch.testing.assert_close(plain.model(*other), model(*other))
    vmap_wins(monkeypatch)
    result = fxfuse.fuse(model, tab_inputs(6), benchmark=False)
    assert [(s.rows, s.lowering) for s in _fused(result)] == [(3, "vmap")]
    with torch.no_grad():
        torch.testing.assert_close(result.model(*other), model(*other))
    assert_map_round_trip(model, result)


@pytest.mark.parametrize("bad", [3, 5, 11, -1])
def test_an_index_past_its_own_table_still_raises(bad):
    """Column 0's table has 3 rows: the padded table has 12, but index 3..11 (or -1)
    must not read the padding or another column's table."""
    model = TabColumns().eval()
    result = fxfuse.fuse(model, tab_inputs(6), lowering="vmap", benchmark=False)
    assert _fused(result)
    cat, cont = tab_inputs(4)
    cat[2, 0] = bad
    for m in (model, result.model):
        with pytest.raises(IndexError):
            m(cat, cont)
    cat[2, 0] = 2
    cat[1, 1] = 6                      # the largest index of each table still reads it
    with torch.no_grad():
        torch.testing.assert_close(result.model(cat, cont), model(cat, cont))


@pytest.mark.parametrize("tail", [None, norm_tail], ids=["linear", "linear-bn-relu"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_heads_of_different_widths_are_one_loop(tail, mode):
    torch.manual_seed(0)
    model = Heads(tail=tail).train(mode == "train")
    result = fxfuse.fuse(model, (torch.randn(6, 4, 16),), lowering="vmap", benchmark=False)
    (site,) = _fused(result)
    assert site.rows == len(WIDTHS)
    assert not [n for n in result.model.graph.nodes if n.op == "call_module"]
    targets = [n.target for n in result.model.graph.nodes]
    assert targets.count(torch.ops.aten.bmm.default) == 1
    assert targets.count("index_select") == 1 and "narrow" not in targets   # one slice-back
    other = torch.randn(9, 4, 16)
    with torch.no_grad():
        want = copy.deepcopy(model)(other)
        got = copy.deepcopy(result.model)(other)
    assert got.shape == (9, sum(WIDTHS))
    torch.testing.assert_close(got, want)
    _grads(model, result, (other,))
    assert_map_round_trip(model, result)
    default = fxfuse.fuse(model, (torch.randn(6, 4, 16),), benchmark=False, auto_rounds=2)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(default.model)(other),
                                   copy.deepcopy(model)(other))


@pytest.mark.parametrize("make,why", [
    (SoftmaxHeads, "`softmax` reduces over the padded axis"),
    (CentredHeads, "`sum` reduces over the padded axis"),
    (lambda: Heads(tail=layernorm_tail), "`LayerNorm` fails on the padded tensors")],
    ids=["softmax", "sum", "layernorm"])
def test_a_reduction_over_the_padded_axis_is_refused(make, why):
    model = make().eval()
    x = torch.randn(6, 4, 16)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    assert not result.changed
    reasons = [s.reason for s in result.sites]
    assert any(r.startswith(f"padding row sizes is not exact here: {why}")
               for r in reasons), reasons
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_refused_padding_still_fuses_the_rows_of_equal_size():
    """Widths (3, 3, 7) under a softmax: not one padded loop (the reason says why), but
    the two rows of width 3 are a loop of their own, as they were without padding."""
    model = SoftmaxHeads(widths=(3, 3, 7)).eval()
    x = torch.randn(6, 3, 16)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    assert [s.rows for s in _fused(result)] == [2]
    assert any("padding row sizes is not exact" in s.reason for s in result.sites)
    other = torch.randn(9, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))


@pytest.mark.parametrize("make,inputs", [
    (TabColumns, lambda b: tab_inputs(b, seed=b)),
    (Heads, lambda b: (torch.randn(b, 4, 16),)),
    (SoftmaxHeads, lambda b: (torch.randn(b, 4, 16),))], ids=["embeddings", "heads", "softmax"])
def test_the_export_route_pads_alike(make, inputs):
    """Under ``torch.export`` the rows are ATen ops on the tables themselves: the same
    loop, the same bound kept, the same refusal."""
    torch.manual_seed(0)
    model = make().eval()
    result = fxfuse.fuse(model, inputs(6), lowering="vmap", benchmark=False, tracer="export")
    if make is SoftmaxHeads:
        assert any("`softmax` reduces over the padded axis" in s.reason for s in result.sites)
        return
    assert [s.rows for s in _fused(result)] == [len(model.heads if make is Heads else CARDS)]
    other = inputs(9)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*other), model(*other))
    assert_map_round_trip(model, result)
    if make is TabColumns:
        cat, cont = inputs(4)
        cat[0, 0] = 5
        with pytest.raises(IndexError):
            result.model(cat, cont)


class KernelScales(nn.Module):
    """'same' convs of kernel sizes (3, 5, 3): a kernel padded at its end shifts the taps."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, k, padding="same") for k in (3, 5, 3))

    def forward(self, x):                       # (B, 3, 2, L)
        return torch.stack([c(x[:, i]) for i, c in enumerate(self.convs)], 1)


def test_conv_kernels_of_different_sizes_are_not_padded_by_the_rows():
    model = KernelScales().eval()
    x = torch.randn(2, 3, 2, 10)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    assert any("`Conv1d` reduces over the padded axis" in s.reason for s in result.sites)
    assert [s.rows for s in _fused(result)] == [2]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_padded_rows_save_as_pt2_with_their_map(tmp_path):
    """The fused model saves and reloads as ``.pt2`` (dynamic batch) with its map; the
    reloaded program is exact at another batch and still raises on a bad index."""
    model = TabColumns().eval()
    result = fxfuse.fuse(model, tab_inputs(6), lowering="vmap", benchmark=False)
    path = tmp_path / "tab.pt2"
    saved = result.save(str(path))
    assert saved.dynamic_batch
    program = torch.export.load(str(path)).module()
    other = tab_inputs(9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(program(*other), model(*other))
    cat, cont = other
    cat[0, 0] = 4
    with pytest.raises((IndexError, RuntimeError)):
        program(cat, cont)
    wm = WeightMap.load(str(path) + ".map.json")
    back = wm.to_original(result.model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_a_padded_stack_entry_needs_its_pad_dim():
    model = Heads().eval()
    result = fxfuse.fuse(model, (torch.randn(6, 4, 16),), lowering="vmap", benchmark=False)
    text = result.weight_map.to_json()
    assert '"pad_dim": 0' in text
    with pytest.raises(ConfigError, match="pad_dim"):
        WeightMap.from_json(text.replace('"pad_dim": 0', '"pad_dim": "x"'))
