"""Pick a site's lowering by measurement (``lowering="auto"``).

The site's whole loop (indexing, every per-row op of every row, the combine) is cut out
of the graph into a small GraphModule of its own: the source and any other tensor the
loop reads become its inputs, the combined result its output, the modules are the same.
Each candidate rewrite is applied to a copy of it, and all are timed side by side on
random inputs with the traced shapes, strides, dtypes and the weights' device, and the
decision is :func:`fxfuse.check.decide.choose_among`'s (minimum of interleaved rounds,
grown until the decision holds, a margin before a rewrite replaces the loop). A site
whose loop cannot be run on its own (:class:`CannotTime`) is kept, with the reason; a
rewrite that fails is an error naming the site, never "kept as a loop".
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import torch
from torch import fx

from .decide import MARGIN, Choice, Clock, choose_among, untimed  # noqa: F401 (re-exported)
from ..errors import CannotTime, FxFuseError, InternalError, RewriteError, one_line
from ..rewrite.rewriter import LOWERINGS, lowerings_for, node_index, rewrite_site
from ..rewrite.siblings import rewrite_siblings
from ..match.sites import RowSite
from ..trace.prepare import forward_copy
from ..trace.tracing import VALUE_KEY

log = logging.getLogger("fxfuse")


def _site_nodes(gm: fx.GraphModule, site: RowSite) -> set[fx.Node]:
    nodes = node_index(gm.graph)
    names = (*site.input_nodes, *site.convs, *(n for c in site.chains for n in c),
             *site.output_nodes, site.combine)
    missing = [n for n in names if n not in nodes]
    if missing:
        raise CannotTime(f"node `{missing[0]}` is not in the graph")
    return {nodes[n] for n in names}


def _is_attr_row(node: fx.Node) -> bool:
    """``W[i]`` of an attribute (a per-row raw weight)."""
    from ..match.kinds.rawparam import attr_row
    return attr_row(node) is not None


def _is_size_query(node: fx.Node, source: fx.Node) -> bool:
    """``source.size(d)``, ``source.shape`` and the like: recomputed in the cut-out."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (node.target is getattr
                                           or "sym_size" in str(node.target))


def extract_loop(gm: fx.GraphModule, site: RowSite) -> fx.GraphModule:
    """The site's loop alone: ``forward(source, *outside_tensors) -> combined``.

    Every node of the loop is copied (all rows, all per-row ops); a tensor the loop reads
    from elsewhere in the graph becomes an extra input (its ``meta`` kept, so timing
    inputs can be made from its traced shape); ``get_attr`` nodes and recorded small
    values (sizes, ints) come along. Modules are shared with ``gm``.

    Raises:
        CannotTime: the loop reads something that is neither a tensor with a traced
            shape nor a recorded value.
    """
    keep = _site_nodes(gm, site)
    source = node_index(gm.graph)[site.source] if site.source else None
    if source is None:
        raise CannotTime("the loop's source tensor is unknown")
    outside = _outside_inputs(gm, keep, source)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in outside:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def arg(node: fx.Node) -> object:
        if node in env:
            return env[node]
        if VALUE_KEY in node.meta:
            return node.meta[VALUE_KEY]
        if node.op == "get_attr" or _is_size_query(node, source) or _is_attr_row(node):
            env[node] = graph.node_copy(node, arg)
            return env[node]
        raise CannotTime(f"the loop reads `{node.name}` from outside")

    for node in gm.graph.nodes:
        if node in keep:
            env[node] = graph.node_copy(node, arg)
    graph.output(env[node_index(gm.graph)[site.combine]])
    return fx.GraphModule(gm, graph, class_name="Loop")


def _outside_inputs(gm: fx.GraphModule, keep: set[fx.Node], source: fx.Node) -> list[fx.Node]:
    """The loop's inputs: ``source``, then every tensor it reads from outside, in order."""
    outside: list[fx.Node] = [source]
    for node in gm.graph.nodes:
        if node not in keep:
            continue
        for inp in node.all_input_nodes:
            if inp in keep or inp in outside or inp.op == "get_attr" or VALUE_KEY in inp.meta \
                    or _is_size_query(inp, source) or _is_attr_row(inp):
                continue
            if "tensor_meta" not in inp.meta:
                raise CannotTime(f"the loop reads `{inp.name}`, which has no traced shape")
            outside.append(inp)
    return outside


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def timing_inputs(loop: fx.GraphModule, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random tensors for ``loop``'s inputs: the traced shape, strides and dtype."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for node in loop.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise CannotTime(f"input `{node.name}` has no traced shape")
        shape, dtype = tuple(meta.shape), meta.dtype
        if dtype.is_floating_point or dtype.is_complex:
            value = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            value = torch.rand(shape, generator=gen) > 0.5
        else:
            value = torch.zeros(shape, dtype=dtype)
        stride = tuple(getattr(meta, "stride", ()) or ())
        if len(stride) == len(shape):
            strided = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            inputs.append(strided.copy_(value))
        else:
            inputs.append(value.to(device))
    return tuple(inputs)


def _candidates(loop: fx.GraphModule, site: RowSite,
                lowerings: tuple[str, ...]) -> dict[str, fx.GraphModule]:
    """The loop and, per lowering, a copy of it rewritten (a rewrite's failure raises)."""
    fns = {"loop": loop}
    for lowering in lowerings_for(site, lowerings):
        fused = forward_copy(loop)   # the rewrite only reads the weights
        _guarded(site, lowering, lambda: rewrite_site(fused, site, lowering))
        fns[lowering] = fused
    return fns


def _guarded(site: RowSite, lowering: str, step: Callable[[], Any]) -> Any:
    """Run ``step`` (rewriting or running a rewrite); a failure is an error naming the
    site, never "kept as a loop": a rewrite that breaks is a bug to see, not to hide."""
    try:
        return step()
    except FxFuseError as exc:
        raise RewriteError(f"site {site.name} ({site.where()}): the {lowering} rewrite "
                           f"failed while auto timed it: {one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - re-raised, with the site named
        raise InternalError(f"site {site.name} ({site.where()}): the {lowering} rewrite "
                            f"raised {type(exc).__name__}: {one_line(exc)}") from exc


def _timed_loop(gm: fx.GraphModule, site: RowSite, extract: Callable
                ) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The site's cut-out (a copy: timing must not touch gm's buffers) and inputs for it,
    after one run of it. Any failure up to here means the loop cannot be timed."""
    loop = extract(gm, site)
    try:
        loop = forward_copy(loop)
        inputs = timing_inputs(loop, _device_of(loop))
        _call(loop, inputs)()
    except CannotTime:
        raise
    except Exception as exc:  # noqa: BLE001 - the original loop itself fails alone
        raise CannotTime(f"the loop alone fails: {_failure_text(exc)}") from exc
    return loop, inputs


def timing_calls(gm: fx.GraphModule, site: RowSite,
                 candidates: tuple[str, ...] = LOWERINGS) -> dict[str, Callable[[], Any]]:
    """The site's loop cut out and each candidate lowering of it, as zero-argument calls
    on timing inputs, every rewrite run once (what ``auto`` times).

    Raises:
        CannotTime: the loop cannot be run on its own.
        RewriteError, InternalError: a candidate rewrite failed (naming the site).
    """
    loop, inputs = _timed_loop(gm, site, extract_loop)
    return _warmed(site, _candidates(loop, site, candidates), inputs)


def sibling_timing_calls(gm: fx.GraphModule, site: RowSite) -> dict[str, Callable[[], Any]]:
    """:func:`timing_calls` for a sibling-Linear site: the separate Linears (``loop``)
    and the fused one (``siblings``)."""
    loop, inputs = _timed_loop(gm, site, extract_siblings)
    fused = forward_copy(loop)   # the rewrite only reads the weights
    _guarded(site, "siblings", lambda: rewrite_siblings(fused, site))
    return _warmed(site, {"loop": loop, "siblings": fused}, inputs)


def _warmed(site: RowSite, fns: dict[str, fx.GraphModule], inputs: tuple[torch.Tensor, ...]
            ) -> dict[str, Callable[[], Any]]:
    """Calls of ``fns`` on ``inputs``; each rewrite run once (a failure names the site)."""
    calls = {k: _call(f, inputs) for k, f in fns.items()}
    for name, call in calls.items():
        if name != "loop":
            _guarded(site, name, call)
    return calls


def _measured(site: RowSite, calls: Callable[[], dict[str, Callable[[], Any]]],
              kept: str, rounds: int, clock: Clock | None, budget_s: float | None) -> Choice:
    """``choose_among`` on ``calls()``; the loop, with a note, when it cannot be timed."""
    try:
        fns = calls()
    except CannotTime as exc:
        reason = _failure_text(exc)
        log.info("%s: cannot time it alone (%s); %s", site.name, reason, kept)
        return untimed(f"{kept}: auto could not time it ({reason})")
    extra = {} if budget_s is None else {"budget_s": budget_s}
    choice = choose_among(fns, rounds=rounds, clock=clock, **extra)
    log.info("%s: %s", site.name, choice.rule())
    return choice


def choose_lowering(gm: fx.GraphModule, site: RowSite, *, rounds: int = 9,
                    candidates: tuple[str, ...] = LOWERINGS, clock: Clock | None = None,
                    budget_s: float | None = None) -> Choice:
    """Time the loop and each candidate lowering for ``site``; return the decision.

    Args:
        gm: the traced module the site was found in (not changed).
        site: a fusable site of ``gm``.
        rounds: interleaved timing rounds of the first decision (doubled until it holds).
        candidates: the lowerings tried for a site with per-row weights.
        clock: seconds now, for :func:`~fxfuse.check.decide.choose_among` (tests pass a
            fake one); budget_s: its time budget (default ``decide.BUDGET_S``).

    Returns:
        A :class:`Choice` (:func:`~fxfuse.check.decide.choose_among`'s rule); the loop,
        with a note, when the loop cannot be timed on its own.

    Raises:
        RewriteError, InternalError: a candidate rewrite failed (naming the site).
    """
    return _measured(site, lambda: timing_calls(gm, site, candidates), "kept as a loop",
                     rounds, clock, budget_s)


def _failure_text(exc: Exception) -> str:
    """One line naming why timing failed: the exception type and its first line."""
    if isinstance(exc, CannotTime):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)[:160]}"


def _call(fn: fx.GraphModule, inputs: tuple[torch.Tensor, ...]):
    def run():
        with torch.inference_mode():
            return fn(*inputs)
    return run


def extract_siblings(gm: fx.GraphModule, site: RowSite) -> fx.GraphModule:
    """A sibling-Linear site alone: ``forward(x) -> (y_1, ..., y_n)`` (modules shared)."""
    nodes = node_index(gm.graph)
    if site.source not in nodes or any(n not in nodes for n in site.convs):
        raise CannotTime("a sibling Linear is not in the graph")
    source = nodes[site.source]
    if "tensor_meta" not in source.meta:
        raise CannotTime(f"the input `{source.name}` has no traced shape")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder(source.name)}
    env[source].meta = dict(source.meta)

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise CannotTime(f"a sibling Linear reads `{node.name}` from outside")
            env[node] = graph.node_copy(node, arg)
        return env[node]

    outs = [graph.node_copy(nodes[n], arg) for n in site.convs]
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph, class_name="Siblings")


def choose_siblings(gm: fx.GraphModule, site: RowSite, *, rounds: int = 9,
                    clock: Clock | None = None, budget_s: float | None = None) -> Choice:
    """:func:`choose_lowering` for a sibling-Linear site: the separate Linears against
    the fused one, timed side by side; the separate ones are kept unless beaten."""
    return _measured(site, lambda: sibling_timing_calls(gm, site), "kept separate",
                     rounds, clock, budget_s)
