"""Per-row chains: the ops one row goes through between its slice and the combine.

A chain is walked back from the row's output through per-row ops (conv, linear, batch
norm, pointwise) for as long as each op's input is another per-row op used only by it.
Rows fuse when their chains have the same steps with equal keys.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from torch import fx, nn

from .kinds import RowOp, row_op
from .rowdag import links, row_dag


@dataclass(frozen=True)
class RowChain:
    """The ops of one row, input → output, and the tensor the first op reads."""

    ops: tuple[RowOp, ...]
    input: fx.Node
    links: tuple[tuple[int, ...], ...] = ()   # a DAG row: per op, its operands (rowdag)

    @property
    def output(self) -> fx.Node:
        return self.ops[-1].node

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(op.kind for op in self.ops)

    @property
    def key(self) -> tuple:
        keys = tuple(op.key for op in self.ops)
        return keys + (self.links,) if self.links else keys

    @property
    def head(self) -> RowOp | None:
        """The first conv or linear op (it names the row in reports)."""
        return next((op for op in self.ops if op.row_kind.heavy), None)

    def describe(self) -> str:
        """``conv→batchnorm→relu→conv``."""
        return "→".join(op.label.split()[0] for op in self.ops)


def row_chain(out: fx.Node, root: nn.Module) -> RowChain | None:
    """The chain ending at ``out``, or None when ``out`` is not a per-row op."""
    ops: list[RowOp] = []
    cur = out
    while True:
        op = row_op(cur, root)
        if op is None:
            break
        ops.append(op)
        nxt = op.input
        if len(nxt.users) != 1 or row_op(nxt, root) is None:
            break
        cur = nxt
    binary = next((i for i, op in enumerate(ops) if op.kind == "binary"), None)
    if binary is not None:      # an op reads two per-row tensors: the row may be a DAG
        dag = row_dag(out, root)
        if dag is not None:
            return RowChain(dag[0], dag[1], links(*dag))
        ops = ops[:binary]           # else the row starts after it
    if not ops:
        return None
    ops.reverse()
    return RowChain(tuple(ops), ops[0].input)


def family_problem(chain: RowChain) -> str:
    """Why a chain mixes ops that cannot share one fused layout, or ``""``."""
    kinds = [op.row_kind for op in chain.ops]
    for i, a in enumerate(kinds):
        other = next((b for b in kinds[i + 1:] if not a.families & b.families), None)
        if other is not None:
            return (f"a row mixes {a.title} and {other.title}, which fuse in different "
                    "layouts; only one of them per loop fuses")
    return ""


def family(chain: RowChain) -> str:
    """``"linear"`` for per-row Linear heads, ``"conv"`` for conv towers: the one layout
    every step of the chain works in (conv when both do)."""
    common = frozenset(("conv", "linear")).intersection(*(op.row_kind.families for op in chain.ops))
    return "conv" if "conv" in common else "linear"


def group_rows(chains: list[RowChain]) -> tuple[tuple[int, ...], ...]:
    """Row positions grouped by equal chain keys, groups in order of first appearance."""
    groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
    for i, chain in enumerate(chains):
        groups.setdefault(chain.key, []).append(i)
    return tuple(tuple(g) for g in groups.values())


def key_difference(a: RowChain, b: RowChain) -> str:
    """Which step and which settings differ between two rows' chains."""
    for x, y in zip(a.ops, b.ops):
        if x.key != y.key:
            names = x.key.differences(y.key) if hasattr(x.key, "differences") else \
                [f.name for f in dataclasses.fields(x.key) if getattr(x.key, f.name) !=
                 getattr(y.key, f.name)] if dataclasses.is_dataclass(x.key) and \
                type(x.key) is type(y.key) else []
            if names:
                fields = ", ".join(f"{f} {getattr(x.key, f)!r} vs {getattr(y.key, f)!r}"
                                   for f in names)
                return f"{x.label.split()[0]} {fields}"
            return f"{x.label} vs {y.label}"
    return "their chains"
