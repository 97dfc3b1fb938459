"""Find the *candidate* loops: a combine (cat, stack or buffer writes) fed by per-row ops.

A candidate only says "these per-row results are joined here, through index-only ops";
``convs`` holds each row's last per-row op (a conv, a Linear, an activation after one).
Whether the rows can be fused is decided later (:mod:`fxfuse.find`). Read-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .ops import ADD, CONVERT, META_CHECK, combine_kind, combine_members, data_input, \
    is_buffer_alloc, is_copy_into, is_index_op


@dataclass
class Candidate:
    """A combine node and the conv outputs that reach it (internal, mutable while built)."""

    combine: fx.Node
    kind: str                                   # "cat", "stack" or "buffer"
    convs: list[fx.Node] = field(default_factory=list)
    output_nodes: set[fx.Node] = field(default_factory=set)
    readers: list[fx.Node] = field(default_factory=list)   # buffer: who reads the result
    prelude: set[fx.Node] = field(default_factory=set)     # buffer: allocation, conversions,
                                                           # metadata checks (not evaluated)
    reason: str = ""

    def graph_order(self, nodes: set[fx.Node]) -> list[fx.Node]:
        """``nodes`` sorted in graph order."""
        return [n for n in self.combine.graph.nodes if n in nodes]


def walk_back(node: fx.Node, stop: set[fx.Node]) -> tuple[list[fx.Node], fx.Node | None]:
    """Follow ``node`` back through index-only ops until a node in ``stop`` or a non-index
    op. Returns the index nodes passed (nearest first) and the node it stopped at."""
    path: list[fx.Node] = []
    cur: fx.Node | None = node
    while cur is not None and cur not in stop and is_index_op(cur):
        path.append(cur)
        cur = data_input(cur)
    return path, cur


def _describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = getattr(node.target, "__name__", str(node.target))
    return f"`{node.name}` ({target})"


def _per_row_op_reason(stops: list[fx.Node], convs: set[fx.Node], kind: str) -> str:
    """When rows end in an extra op after their conv (``relu(conv(x_h))``), say so.

    One such row is no loop (``cat([x, relu(conv(x))])``), and a join of whole loop
    results (``cat([stack_a, stack_b])``) is not a per-row op: neither is reported."""
    per_row = [stop for stop in stops if combine_kind(stop) is None and any(
        walk_back(arg, convs)[1] in convs for arg in stop.all_input_nodes)]
    if len(per_row) < 2:
        return ""
    layers = [walk_back(arg, convs)[1] for arg in per_row[0].all_input_nodes]
    word = layer_word([n for n in layers if n in convs])
    return (f"per-row op {_describe(per_row[0])} between the {word} and the {kind}; "
            f"only {word}s, per-row ops fxfuse knows and index ops may sit inside the loop")


def layer_word(nodes: list[fx.Node]) -> str:
    """What the rows' layers are, for reasons: ``conv``, ``Linear``, or ``layer`` when
    they are mixed or unknown (a reason about Linear rows must not say conv)."""
    from .chains import row_chain     # chains need the kinds; candidates need neither
    words = set()
    for node in nodes:
        root = node.graph.owning_module
        chain = row_chain(node, root) if root is not None else None
        head = chain.head if chain is not None else None
        words.add({"conv": "conv", "linear": "Linear"}.get(head.kind if head else "", "layer"))
    return words.pop() if len(words) == 1 else "layer"


def _gather_rows(values: list[object], convs: set[fx.Node], cand: Candidate) -> None:
    """Walk each joined value back to its conv; record convs, the index nodes passed,
    and a reason when some value is not a conv row."""
    stops: list[object] = []
    for value in values:
        if not isinstance(value, fx.Node):
            stops.append(value)
            continue
        path, base = walk_back(value, convs)
        if base in convs:
            cand.convs.append(base)
            cand.output_nodes.update(path)
        else:
            stops.append(base if base is not None else value)
    if len(set(cand.convs)) != len(cand.convs):
        cand.reason = f"the same {layer_word(cand.convs)} output is joined more than once"
    elif stops and len(cand.convs) >= 2:
        cand.reason = (f"{len(stops)} of the {len(values)} joined tensors are not per-row "
                       f"{layer_word(cand.convs)} outputs (first: {_describe(stops[0])})")
    elif stops and not cand.convs:
        cand.reason = _per_row_op_reason([s for s in stops if isinstance(s, fx.Node)],
                                         convs, cand.kind)


def cat_candidate(node: fx.Node, convs: set[fx.Node]) -> Candidate | None:
    """A cat/stack node whose inputs come from per-row convs, or None."""
    kind = combine_kind(node)
    if kind is None:
        return None
    cand = Candidate(node, kind)
    members = combine_members(node)
    _gather_rows(members, convs, cand)
    if not cand.convs and not cand.reason:
        return None
    if len(members) < 2:
        return None
    return cand


def _write_value(node: fx.Node) -> object:
    if node.op == "call_function" and len(node.args) == 3:   # operator.setitem(dst, idx, v)
        return node.args[2]
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("src")


def converted_buffer(alloc: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
    """The buffer a fresh allocation becomes after conversions that leave it fresh
    (``.to(device)``, ``.to(dtype)``, ``.type_as(x)``, ``.cuda()``), and the nodes passed
    on the way (the allocation, earlier conversions, export's metadata checks)."""
    cur, passed = alloc, set()
    while True:
        users = [u for u in cur.users if not META_CHECK.matches(u)]
        if len(users) != 1 or not CONVERT.matches(users[0]) or data_input(users[0]) is not cur:
            return cur, passed
        passed.add(cur)
        passed.update(u for u in cur.users if META_CHECK.matches(u))
        cur = users[0]


def _buffer_uses(buffer: fx.Node
                 ) -> tuple[set[fx.Node], list[fx.Node], list[fx.Node], set[fx.Node]]:
    """The buffer's views that lead to writes (itself included), the writes into them,
    every reader of the result (a view that leads to no write is a reader), and the
    metadata checks on the buffer."""
    views, writes, readers, checks = _walk_buffer(buffer)
    feeding = _feeding_views(buffer, writes)
    reads = views - feeding     # views of the result, read after the loop
    readers = [r for r in readers if not any(a in reads for a in r.all_input_nodes)]
    readers += [v for v in reads if data_input(v) in feeding]
    return feeding, writes, readers, checks


def _walk_buffer(buffer: fx.Node
                 ) -> tuple[set[fx.Node], list[fx.Node], list[fx.Node], set[fx.Node]]:
    """The buffer's views, the writes into them, their other users, and its metadata checks."""
    views, writes, readers, checks, pending = {buffer}, [], [], set(), [buffer]
    while pending:
        for user in pending.pop().users:
            if is_copy_into(user) and user.args and user.args[0] in views:
                writes.append(user)
            elif is_index_op(user) and data_input(user) in views:
                views.add(user)
                pending.append(user)
            elif META_CHECK.matches(user) and data_input(user) is buffer:
                checks.add(user)
            else:
                readers.append(user)
    return views, writes, readers, checks


def _feeding_views(buffer: fx.Node, writes: list[fx.Node]) -> set[fx.Node]:
    """The buffer and every view on the path from it to a write's destination."""
    feeding = {buffer}
    for write in writes:
        cur = write.args[0]
        while isinstance(cur, fx.Node) and cur not in feeding:
            feeding.add(cur)
            cur = data_input(cur)
    return feeding


def _buffer_reason(cand: Candidate, buffer: fx.Node, last_write: int,
                   order: dict[fx.Node, int]) -> str:
    early = [r for r in cand.readers if order[r] < last_write]
    viewed = [r for r in cand.readers if r not in buffer.users]
    if early:
        return (f"the buffer is read by {_describe(early[0])} before every row is "
                "written (rows may depend on each other)")
    if viewed:
        return f"a view of the buffer is also read elsewhere ({_describe(viewed[0])})"
    return ""


def buffer_candidate(alloc: fx.Node, convs: set[fx.Node],
                     order: dict[fx.Node, int]) -> Candidate | None:
    """A preallocated tensor written row by row (``out[:, :, h] = conv_h(...)``), or None."""
    if not is_buffer_alloc(alloc):
        return None
    buffer, prelude = converted_buffer(alloc)
    views, writes, readers, checks = _buffer_uses(buffer)
    if not writes:
        return None
    cand = Candidate(buffer, "buffer", readers=readers, prelude=prelude | checks)
    writes.sort(key=order.__getitem__)
    cand.output_nodes.update(views - {buffer})
    cand.output_nodes.update(writes)
    cand.output_nodes.update(cand.prelude)
    _gather_rows([_write_value(w) for w in writes], convs, cand)
    if not cand.convs and not cand.reason:
        return None
    cand.reason = cand.reason or _buffer_reason(cand, buffer, order[writes[-1]], order)
    return cand


def _is_add(node: fx.Node) -> bool:
    return ADD.calls_function(node)


def _sum_terms(node: fx.Node) -> tuple[list[object], list[fx.Node]] | None:
    """The terms of ``((0 + r0) + r1) + ...`` ending at ``node`` (in order) and the adds,
    or None when an intermediate sum is used elsewhere."""
    terms, adds, cur = [], [], node
    while isinstance(cur, fx.Node) and _is_add(cur) and len(cur.args) == 2 and not cur.kwargs:
        adds.append(cur)
        left, right = cur.args
        terms.append(right)
        if isinstance(left, (int, float)) and left == 0:
            break
        if not isinstance(left, fx.Node) or (cur is not node and len(cur.users) != 1):
            return None
        if not _is_add(left) or len(left.users) != 1:
            terms.append(left)
            break
        cur = left
    terms.reverse()
    return terms, adds


def sum_candidate(node: fx.Node, row_ops: set[fx.Node]) -> Candidate | None:
    """The last ``add`` of a chain ``((0 + r0) + r1) + ...`` over per-row results, or None."""
    if not _is_add(node) or any(_is_add(u) for u in node.users) or node.kwargs:
        return None
    found = _sum_terms(node)
    if found is None:
        return None
    terms, adds = found
    cand = Candidate(node, "sum")
    for term in terms:
        path, base = walk_back(term, row_ops) if isinstance(term, fx.Node) else ([], None)
        if base not in row_ops or path:
            return None
        cand.convs.append(base)
    if len(cand.convs) < 2:
        return None
    cand.output_nodes.update(a for a in adds if a is not node)
    return cand


def find_candidates(graph: fx.Graph, convs: set[fx.Node]) -> list[Candidate]:
    """Every cat/stack/buffer/sum in ``graph`` that joins per-row results, in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found: list[Candidate] = []
    for node in graph.nodes:
        cand = cat_candidate(node, convs) if combine_kind(node) else \
            buffer_candidate(node, convs, order) if is_buffer_alloc(node) else \
            sum_candidate(node, convs)
        if cand is not None:
            found.append(cand)
    return found
