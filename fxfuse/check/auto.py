"""Pick a site's lowering by measurement (``lowering="auto"``).

The site's loop is cut out of the graph into a small GraphModule of its own (source in,
combined result out, the same modules), each candidate rewrite is applied to a copy of
it, and all are timed side by side on a random input with the source's real shape,
dtype and device. The loop is kept unless a rewrite beats it.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import fx

from .bench import time_interleaved, timing_of
from ..rewrite.rewriter import LOWERINGS, lowerings_for, node_index, rewrite_site
from ..match.sites import RowSite
from ..trace.tracing import VALUE_KEY, tensor_dtype, tensor_shape

log = logging.getLogger("fxfuse")


def extract_loop(gm: fx.GraphModule, site: RowSite) -> fx.GraphModule:
    """The site's loop alone: ``forward(source) -> combined``, sharing ``gm``'s modules."""
    nodes = node_index(gm.graph)
    keep = {nodes[n] for n in (*site.input_nodes, *site.convs, *site.output_nodes, site.combine)}
    graph = fx.Graph()
    source = nodes[site.source]
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder(source.name)}
    env[source].meta = dict(source.meta)

    def arg(node: fx.Node) -> object:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.node_copy(node)
            return env[node]
        if VALUE_KEY in node.meta:
            return node.meta[VALUE_KEY]
        if node.op == "call_function" and node.args and node.args[0] is source:
            env[node] = graph.node_copy(node, arg)   # e.g. a size query on the source
            return env[node]
        raise ValueError(f"the loop reads `{node.name}` from outside")

    for node in gm.graph.nodes:
        if node in keep:
            env[node] = graph.node_copy(node, arg)
    graph.output(env[nodes[site.combine]])
    return fx.GraphModule(gm, graph, class_name="Loop")


def _random_source(gm: fx.GraphModule, site: RowSite) -> torch.Tensor:
    node = node_index(gm.graph)[site.source]
    dtype = tensor_dtype(node) or torch.float32
    return torch.randn(tensor_shape(node), device=site.spec.device).to(dtype)


def choose_lowering(gm: fx.GraphModule, site: RowSite, *, rounds: int = 9,
                    candidates: tuple[str, ...] = LOWERINGS
                    ) -> tuple[str, tuple[tuple[str, float], ...]]:
    """Time the loop and each candidate lowering for ``site``; return the fastest.

    Returns:
        (``"loop"`` or a lowering name, ((candidate, median seconds), ...)). The loop is
        chosen unless a rewrite's median per-round speedup over it is above 1.
    """
    try:
        loop = copy.deepcopy(extract_loop(gm, site))   # timing must not touch gm's buffers
    except (ValueError, KeyError) as exc:
        log.info("%s: cannot time the loop alone (%s); using 'grouped'", site.name, exc)
        return "grouped", ()
    x = _random_source(gm, site)
    fns = {"loop": loop}
    for lowering in lowerings_for(site, candidates):
        fused = copy.deepcopy(loop)
        rewrite_site(fused, site, lowering)
        fns[lowering] = fused

    def call(fn):
        def run():
            with torch.inference_mode():
                return fn(x)
        return run

    calls = {k: call(f) for k, f in fns.items()}
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
    return best, tuple(medians.items())


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
