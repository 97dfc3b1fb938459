"""The interface every per-row op kind implements, and the registry of kinds.

A *row op* is one step of one row of a loop (a conv, a Linear, a batch norm, an
activation, ...). Its :class:`RowKind` says everything the pass needs to know about it:

- ``recognise(node, root)``: is this node such an op (in the fx and the ATen spellings)?
  If so, a :class:`RowOp` with the op's *key*, a frozen dataclass of the settings that
  must agree for one fused op to compute every row (weights aside);
- ``emit(lane, ops)``: the fused step for a group of rows, on the running :class:`Lane`,
  with the weight-map entries of the tensors it created;
- ``can_sum(op)`` / ``dense(...)``: whether rows ending in this op can be summed by one
  dense op, and that op;
- ``families``: which fused layouts it works in (``"conv"``: (N, G*C, L) grouped channels;
  ``"linear"``: (N, G, ..., L) batched matmul).

Kinds register by name (:func:`register`); adding one is one file in this package and
one import line in its ``__init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import fx, nn

from ..ops import hooks_of, reemit
from ..params import twin_key  # noqa: F401  (re-exported: one key for twin loops)

Family = Literal["conv", "linear"]
FAMILIES: frozenset[str] = frozenset(("conv", "linear"))

REGISTRY: dict[str, "RowKind"] = {}


def register(name: str):
    """Class decorator: add one instance of the kind to the registry under ``name``."""
    def wrap(cls: type[RowKind]) -> type[RowKind]:
        if name in REGISTRY:
            raise ValueError(f"row-op kind {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls()
        return cls
    return wrap


@dataclass(frozen=True)
class RowOp:
    """One per-row op.

    Attributes:
        node: the graph node.
        kind: the registered name of its :class:`RowKind` (``"conv"``, ``"pointwise"``...).
        key: equal keys → one fused op computes both rows (a frozen dataclass).
        params: (role, state_dict key) of each tensor the op reads (weight, bias, ...).
        module: the call_module target, when the op is a module call.
        input: the tensor the op transforms.
        label: a short text for reports (``conv 15→15 k3``, ``relu``).
    """

    node: fx.Node
    kind: str
    key: Any
    params: tuple[tuple[str, str], ...]
    module: str | None
    input: fx.Node
    label: str

    @property
    def row_kind(self) -> "RowKind":
        """The kind's implementation."""
        return REGISTRY[self.kind]

    def param(self, role: str) -> str | None:
        """The state_dict key playing ``role``, if any."""
        return dict(self.params).get(role)


@dataclass
class Lane:
    """The fused rows as they are being emitted: the current node and its layout.

    Conv family: ``node`` is (N, G*C, L), or (N, G*C, 1, L) channels-last before the
    first ``grouped2d`` conv (``two_d``); ``channels`` is C, per row. Linear family:
    ``node`` is (N, G, ..., L), each row ``row_ndim``-D.
    """

    gm: fx.GraphModule
    node: fx.Node
    family: Family
    rows: int
    prefix: str
    lowering: str
    channels: int = 0
    row_ndim: int = 0
    two_d: bool = False
    entries: list = field(default_factory=list)
    values: dict = field(default_factory=dict)   # row op node (first row) → (node, two_d)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def flat(self) -> fx.Node:
        """The node in its 3-D (conv) or row (linear) layout."""
        if self.two_d:
            self.node, self.two_d = self.graph.call_method("squeeze", (self.node, 2)), False
        return self.node

    def value(self, orig: fx.Node) -> fx.Node:
        """The fused value of ``orig`` (a node of the group's first row: its input or one
        of its ops already emitted), in the flat layout; for ops with two per-row operands."""
        node, two_d = self.values[orig]
        return self.graph.call_method("squeeze", (node, 2)) if two_d else node

    def per_row(self) -> fx.Node:
        """The node as (N, G, ...): one slot per row."""
        if self.family == "linear":
            return self.node
        return self.graph.call_method("unflatten", (self.flat(), 1, (self.rows, self.channels)))

    def set_per_row(self, node: fx.Node) -> None:
        """Continue from an (N, G, ...) node."""
        self.node = node if self.family == "linear" else \
            self.graph.call_method("flatten", (node, 1, 2))


def called_module(node: fx.Node, root: nn.Module, types: tuple[type, ...]) -> nn.Module | None:
    """The module ``node`` calls, when its type is exactly one of ``types`` (a subclass may
    compute something else) and it is called on one tensor; else None."""
    if node.op != "call_module":
        return None
    mod = root.get_submodule(str(node.target))
    if type(mod) not in types or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    return mod


def roles(**keys: str | None) -> tuple[tuple[str, str], ...]:
    """``RowOp.params`` from role=key pairs, leaving out absent tensors."""
    return tuple((role, key) for role, key in keys.items() if key)


class RowKind:
    """One kind of per-row op. Subclasses set the class attributes and ``recognise``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""                 # how users call it: "Conv1d", "LayerNorm"
    families: ClassVar[frozenset[str]] = FAMILIES
    heavy: ClassVar[bool] = False             # carries the layer weights that name a row
    per_element: ClassVar[bool] = False       # weightless, the same for all rows: applied once
    batch_statistics: ClassVar[bool] = False  # folding rows into the batch changes its result
    module_base: ClassVar[type[nn.Module] | None] = None
    loop_title: ClassVar[str] = ""            # for a loop headed by this kind: "Conv1d"

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        """Describe ``node`` as an op of this kind, or None."""
        raise NotImplementedError

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        """Apply the fused step for ``ops`` (one per row of the group) to ``lane``."""
        op = ops[0]
        lane.node = reemit(lane.graph, op.node, op.input, lane.flat())

    def can_sum(self, op: RowOp) -> bool:
        """True when rows ending in ``op`` can be summed by one dense op."""
        return False

    def dense(self, ops: list[RowOp], weight: Any) -> nn.Module:
        """The dense module computing Σ_h op_h(x_h) (weights concatenated on the input
        dim, no bias); only for kinds whose ``can_sum`` may be true."""
        raise NotImplementedError(self.name)

    def rows_problem(self, root: nn.Module, ops: list[RowOp]) -> str:
        """Why these rows' ops (one per row, same key) cannot be fused, or ``""``."""
        return ""

    def module_problem(self, root: nn.Module, op: RowOp) -> str:
        """Why this op's module cannot be replaced by a fused one, or ``""``."""
        if op.module is None or self.module_base is None:
            return ""
        mod = root.get_submodule(op.module)
        if type(mod).forward is not self.module_base.forward:
            return f"{op.module} is a {type(mod).__name__} with its own forward"
        hooks = hooks_of(mod)
        if hooks:
            return f"{op.module} has {', '.join(hooks)}, which a fused module would lose"
        return ""


class MatmulKind(RowKind):
    """A kind whose rows carry a layer's weights and fuse as one batched matmul."""

    families = frozenset(("linear",))
    heavy = True
