"""Pick a site's lowering by measurement (``lowering="auto"``).

The site's whole loop (indexing, every per-row op of every row, the combine) is cut out
of the graph into a small GraphModule of its own: the source and any other tensor the
loop reads become its inputs, the combined result its output, the modules are the same.
Each candidate rewrite is applied to a copy of it, and all are timed side by side on
random inputs with the traced shapes, strides, dtypes and the weights' device. The loop
is kept unless a rewrite beats it; a site that cannot be timed is kept too, with the
reason.
"""
from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch
from torch import fx

from .bench import time_interleaved, timing_of
from ..rewrite.rewriter import LOWERINGS, lowerings_for, node_index, rewrite_site
from ..match.sites import RowSite
from ..trace.tracing import VALUE_KEY

log = logging.getLogger("fxfuse")


class CannotTime(Exception):
    """The site's loop cannot be run on its own (the message says why)."""


@dataclass(frozen=True)
class Choice:
    """What ``auto`` decided for one site.

    Attributes:
        lowering: ``"loop"`` (keep it) or a lowering name.
        timings: (candidate, median seconds) for the loop and each rewrite tried.
        note: why the loop was kept without timing (``""`` when it was timed).
    """

    lowering: str
    timings: tuple[tuple[str, float], ...] = ()
    note: str = ""


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
    fns = {"loop": loop}
    for lowering in lowerings_for(site, lowerings):
        fused = copy.deepcopy(loop)
        rewrite_site(fused, site, lowering)
        fns[lowering] = fused
    return fns


def choose_lowering(gm: fx.GraphModule, site: RowSite, *, rounds: int = 9,
                    candidates: tuple[str, ...] = LOWERINGS) -> Choice:
    """Time the loop and each candidate lowering for ``site``; return the fastest.

    Args:
        gm: the traced module the site was found in (not changed).
        site: a fusable site of ``gm``.
        rounds: interleaved timing rounds (more when the first result is too close).
        candidates: the lowerings tried for a site with per-row weights.

    Returns:
        A :class:`Choice`: the loop unless a rewrite's median per-round speedup over it is
        above :data:`MARGIN`; the loop, with a note, when the site cannot be timed.
    """
    try:
        loop = copy.deepcopy(extract_loop(gm, site))   # timing must not touch gm's buffers
        inputs = timing_inputs(loop, _device_of(loop))
        fns = _candidates(loop, site, candidates)
        calls = _warmed({k: _call(f, inputs) for k, f in fns.items()})
    except Exception as exc:  # noqa: BLE001 - any failure means "not measured": keep the loop
        reason = _failure_text(exc)
        log.info("%s: cannot time the loop alone (%s); keeping the loop", site.name, reason)
        return Choice("loop", (), f"kept as a loop: auto could not time it ({reason})")
    return _timed_choice(site, calls, rounds)


def _failure_text(exc: Exception) -> str:
    """One line naming why timing failed: the exception type and its first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _warmed(calls: dict) -> dict:
    """Run each call once (warm-up; a failure here means the site cannot be timed)."""
    for fn in calls.values():
        fn()
    return calls


def _timed_choice(site: RowSite, calls: dict, rounds: int) -> Choice:
    """Time ``calls`` interleaved (longer when too close) and pick the loop unless beaten."""
    samples = time_interleaved(calls, rounds=rounds, round_s=0.01)
    top, (q1, med) = _top_rewrite(samples)
    if 0.9 < med < 1.2 or (med > MARGIN and q1 <= 1.0):
        # Too close to call: measure again, longer, and decide on all rounds.
        more = time_interleaved(calls, rounds=2 * rounds, round_s=0.02)
        samples = {k: samples[k] + more[k] for k in samples}
        top, (q1, med) = _top_rewrite(samples)
    best = top if med > MARGIN and q1 > 1.0 else "loop"
    medians = {k: timing_of(v).median_s for k, v in samples.items()}
    log.info("%s: %s -> %s", site.name,
             ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()), best)
    return Choice(best, tuple(medians.items()))


def _call(fn: fx.GraphModule, inputs: tuple[torch.Tensor, ...]):
    def run():
        with torch.inference_mode():
            return fn(*inputs)
    return run


# A rewrite must beat the loop by this factor in the median round, and in its lower
# quartile beat it at all, before "auto" picks it: on a noisy machine ties go to the loop.
MARGIN = 1.05


def _top_rewrite(samples: dict[str, list[float]]) -> tuple[str, tuple[float, float]]:
    """The rewrite with the best median per-round speedup over the loop: (name, (q1, median))."""
    best, stats = "loop", (0.0, 0.0)
    for name, times in samples.items():
        if name == "loop":
            continue
        ratios = sorted(a / b for a, b in zip(samples["loop"], times))
        q1, med = ratios[len(ratios) // 4], ratios[len(ratios) // 2]
        if med > stats[1]:
            best, stats = name, (q1, med)
    return best, stats


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


def choose_siblings(gm: fx.GraphModule, site: RowSite, *, rounds: int = 9) -> Choice:
    """:func:`choose_lowering` for a sibling-Linear site: the separate Linears against
    the fused one, timed side by side; the separate ones are kept unless beaten."""
    from ..rewrite.siblings import rewrite_siblings
    try:
        loop = copy.deepcopy(extract_siblings(gm, site))
        inputs = timing_inputs(loop, _device_of(loop))
        fused = copy.deepcopy(loop)
        rewrite_siblings(fused, site)
        calls = _warmed({"loop": _call(loop, inputs), "siblings": _call(fused, inputs)})
    except Exception as exc:  # noqa: BLE001 - any failure means "not measured": keep the loop
        reason = _failure_text(exc)
        log.info("%s: cannot time the siblings alone (%s); keeping them", site.name, reason)
        return Choice("loop", (), f"kept separate: auto could not time it ({reason})")
    return _timed_choice(site, calls, rounds)
