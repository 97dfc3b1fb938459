"""From H joined tensors to a plan: which rows are the same code, and what each reads.

A plan holds node references (not names) and is private to the structural fusion.
Planning is a chain of named checks; each returns what it found or raises
:class:`Refused` with the reason a user reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .graphfacts import is_tensor_node, mutated_input
from .rows import RowSplit, externals, leaks
from .signature import reader_constants, readers, row_signature
from .sizes import pads


class Refused(Exception):
    """This group of rows cannot be vectorised, for the reason given."""


@dataclass(frozen=True)
class RowPlan:
    """H isomorphic rows and how to run them as one.

    Attributes:
        rows: the row indices (positions in the join) this plan fuses.
        outputs: per row, its joined result.
        bodies: per row, the nodes that run inside the vectorised body, aligned by position.
        readers: per row, the nodes that pick the row's slice (run as they are), aligned.
        inputs: per input slot, per row, the node the body reads (a shared tensor is the
            same node in every row).
        leaks: body positions whose values are used outside the row.
        padded: the rows differ in sizes; their tensors are padded to the largest.
    """

    rows: tuple[int, ...]
    outputs: tuple[fx.Node, ...]
    bodies: tuple[tuple[fx.Node, ...], ...]
    readers: tuple[tuple[fx.Node, ...], ...]
    inputs: tuple[tuple[fx.Node, ...], ...]
    leaks: tuple[int, ...]
    padded: bool = False

    @property
    def size(self) -> int:
        return len(self.rows)

    def shared(self, slot: int) -> bool:
        """Every row reads the same node at input ``slot``."""
        return len(set(self.inputs[slot])) == 1

    def nodes(self) -> set[fx.Node]:
        """Every node the rewrite replaces (bodies and readers)."""
        return {n for b in (*self.bodies, *self.readers) for n in b}


def group_rows(split: RowSplit, gm: fx.GraphModule, min_rows: int) -> list[list[int]]:
    """Rows with equal signatures, in join order (classes of at least ``min_rows``);
    rows whose signatures differ only in sizes that padding covers (:mod:`sizes`) are
    one class."""
    classes: dict[tuple, list[int]] = {}
    sizeless: dict[tuple, list[tuple]] = {}
    for row, body in enumerate(split.bodies):
        if body:
            key = row_signature(body, gm)
            if key not in classes:
                sizeless.setdefault(row_signature(body, gm, sized=False), []).append(key)
            classes.setdefault(key, []).append(row)
    found = []
    for keys in sizeless.values():
        rows = sorted(r for k in keys for r in classes[k])
        if len(keys) > 1 and len(rows) >= min_rows and pads(split.bodies, rows, gm):
            found.append(rows)
        else:
            found += [classes[k] for k in keys if len(classes[k]) >= min_rows]
    return found


def has_parameters(body: tuple[fx.Node, ...]) -> bool:
    """The row runs a module or reads an attribute: a layer, not only activations."""
    return any(n.op in ("call_module", "get_attr") for n in body)


def plan_rows(split: RowSplit, rows: list[int], gm: fx.GraphModule) -> RowPlan:
    """Peel the readers, align the inputs and results, check what the rows may do.

    Raises:
        Refused: a row writes into a shared tensor, or leaks a non-tensor value.
    """
    full = [split.bodies[r] for r in rows]
    peel = _reader_positions(full)
    bodies = tuple(tuple(n for i, n in enumerate(b) if i not in peel) for b in full)
    readers = tuple(tuple(n for i, n in enumerate(b) if i in peel) for b in full)
    per_row = [externals(b) for b in bodies]
    if len({len(e) for e in per_row}) != 1:
        raise Refused("rows read different numbers of outside tensors")
    inputs = tuple(zip(*per_row))
    _check_writes(bodies, gm)
    leak_pos = _leak_positions(bodies)
    outputs = tuple(split.outputs[r] for r in rows)
    padded = len({row_signature(split.bodies[r], gm) for r in rows}) > 1
    return RowPlan(tuple(rows), outputs, bodies, readers, inputs, leak_pos, padded)


def _leak_positions(bodies: tuple[tuple[fx.Node, ...], ...]) -> tuple[int, ...]:
    """Positions whose values any row uses outside itself; each must be a tensor."""
    positions = sorted({b.index(n) for b in bodies for n in leaks(b)})
    for body in bodies:
        for pos in positions:
            if not is_tensor_node(body[pos]):
                raise Refused(f"`{body[pos].name}` (a non-tensor value) is used outside its row")
    return tuple(positions)


def _reader_positions(bodies: list[tuple[fx.Node, ...]]) -> set[int]:
    """Positions of the reads that pick each row's slice: readers whose constants differ
    between rows (``x[:, i]``), the reads they index (``x[:, :]`` before it), and ops
    that index with numbers worked out per row (``x[:, a:b]``)."""
    first = bodies[0]
    pre = readers(first)
    pos = {n: i for i, n in enumerate(first)}
    peel = {pos[n] for n in pre if len({reader_constants(b[pos[n]]) for b in bodies}) > 1}
    grown = True
    while grown:
        peeled = {first[i] for i in peel}
        more = {pos[d] for n in peeled for d in n.all_input_nodes if d in pre}
        more |= {pos[n] for n in pre if any(d in peeled and not is_tensor_node(d)
                                           for d in n.all_input_nodes)}
        grown = not more <= peel
        peel |= more
    return peel


def _check_writes(bodies: tuple[tuple[fx.Node, ...], ...], gm: fx.GraphModule) -> None:
    for body in bodies:
        inside = set(body)
        for node in body:
            base = mutated_input(node, gm)
            if base is not None and base not in inside:
                raise Refused(f"`{node.name}` writes into `{base.name}`, which is read "
                              "outside its row")
