"""Rows that index tables of the same size (no padding): the fused loop still raises on
an index the row alone rejects, instead of reading the next (or previous) row's table."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from helpers import vmap_wins

CARD, COLUMNS = 10, 3


class EqualColumns(nn.Module):
    """One embedding per categorical column, every table with ``CARD`` rows."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(CARD, d) for _ in range(COLUMNS))

    def forward(self, cat, cont):
        parts = [e(cat[:, i]) for i, e in enumerate(self.embeds)]
        return torch.cat(parts + [cont], dim=1)


def _inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CARD, (batch, COLUMNS), generator=gen), \
        torch.randn(batch, 2, generator=gen)


def _fuse(tracer: str, lowering: str | None):
    torch.manual_seed(0)
    model = EqualColumns().eval()
    kwargs = {"lowering": lowering} if lowering else {}
    result = fxfuse.fuse(model, _inputs(6), tracer=tracer, benchmark=False, **kwargs)
    assert [s for s in result.sites if s.fused and s.rows == COLUMNS]
    return model, result


def _raised(fn, *args):
    try:
        with torch.no_grad():
            fn(*args)
    except Exception as exc:       # the original's own exception type is the reference
        return type(exc)
    return None


@pytest.mark.parametrize("lowering", [None, "vmap"], ids=["default", "vmap"])
@pytest.mark.parametrize("tracer", ["symbolic", "export"])
@pytest.mark.parametrize("bad", [CARD, -1, CARD + 1])
@pytest.mark.parametrize("column", [0, 1, COLUMNS - 1])
def test_an_index_past_an_equal_table_still_raises(tracer, lowering, bad, column, monkeypatch):
    if lowering is None:
        vmap_wins(monkeypatch)         # the default path, with auto choosing the loop
    model, result = _fuse(tracer, lowering)
    cat, cont = _inputs(4, seed=1)
    cat[2, column] = bad
    want = _raised(model, cat, cont)
    assert want is IndexError
    got = _raised(result.model, cat, cont)
    assert got is not None and issubclass(got, (IndexError, RuntimeError)), got
    cat[2, column] = CARD - 1          # the last row of each table still reads it
    cat[1, column] = 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(cat, cont), model(cat, cont))


def test_equal_tables_save_as_pt2_and_still_raise(tmp_path):
    model, result = _fuse("symbolic", "vmap")
    path = tmp_path / "equal.pt2"
    assert result.save(str(path)).dynamic_batch
    program = torch.export.load(str(path)).module()
    other = _inputs(9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(program(*other), model(*other))
    cat, cont = other
    for bad in (CARD, -1):
        cat[0, 1] = bad
        with pytest.raises((IndexError, RuntimeError)):
            program(cat, cont)


class Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(CARD, 4))

    def forward(self, index):
        return self.table[index]


class IndexedColumns(nn.Module):
    """Rows that read ``table[index]``: ``-1`` is the row's last entry, ``CARD`` raises."""

    def __init__(self):
        super().__init__()
        self.rows = nn.ModuleList(Indexed() for _ in range(COLUMNS))

    def forward(self, cat):
        return torch.cat([r(cat[:, i]) for i, r in enumerate(self.rows)], 1)


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_rows_that_wrap_negative_indices_still_fuse_and_keep_their_bound(tracer):
    torch.manual_seed(0)
    model = IndexedColumns().eval()
    cat = _inputs(6)[0]
    result = fxfuse.fuse(model, (cat,), lowering="vmap", tracer=tracer, benchmark=False)
    assert [s for s in result.sites if s.fused and s.rows == COLUMNS]
    cat[1, 1], cat[2, 2] = -1, -CARD
    with torch.no_grad():
        torch.testing.assert_close(result.model(cat), model(cat))
    for bad in (CARD, -CARD - 1):
        cat[1, 1] = bad
        assert _raised(model, cat) is IndexError
        assert _raised(result.model, cat) is not None
