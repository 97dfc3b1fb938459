"""The one driver: for each fusion in turn, find, choose a lowering per site, rewrite,
clean up; then the final clean-up (lint, recompile, unused modules, kept tensors).

``fxfuse.fuse``, ``fxfuse inspect`` / ``fuse`` and the ``torch.compile`` backend all
run this. The fusions are :data:`fxfuse.passes.registry.REGISTRY`: the row-op kinds
(grouped convolutions, batched matmuls, sibling Linears) go first, as the fast special
cases; loops they leave are matched by structure and vectorised. Under
``lowering="vmap"`` every loop is vectorised. A node an earlier fusion's rewrite
inserted is claimed: no later fusion takes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..check.decisions import Decisions
from ..config import FuseConfig
from ..match.sites import RowSite
from ..progress import stage
from ..rewrite.rewriter import finalize_graph
from ..weightmap import WeightEntry, WeightMap
from ..trace.export import fix_mode
from .fusion import Context
from .registry import fusions_for
from .step import apply_found

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class PassResult:
    """What the pass did: every site (in graph order of finding), the weight map, and
    whether the graph changed."""

    sites: tuple[RowSite, ...]
    weight_map: WeightMap
    changed: bool


def find_sites(gm: fx.GraphModule, inputs: tuple[Any, ...], config: FuseConfig
               ) -> tuple[RowSite, ...]:
    """Every site every fusion finds, without changing ``gm`` (``fxfuse inspect``): a
    site an earlier fusion would rewrite claims its nodes."""
    sites: list[RowSite] = []
    claimed: frozenset[fx.Node] = frozenset()
    for fusion in fusions_for(config):
        found = fusion.find(gm, Context(config, inputs, claimed, first=len(sites)))
        claimed |= frozenset(n for f in found if f.site.fusable for n in f.nodes)
        sites.append(tuple(f.site for f in found))
    return _report(sites)


def run_pass(gm: fx.GraphModule, inputs: tuple[Any, ...], config: FuseConfig, *,
             decisions: Decisions | None = None, structural: bool = True,
             batched: tuple[bool, ...] | None = None) -> PassResult:
    """Rewrite ``gm`` in place (see the module docstring).

    Args:
        gm: the traced model (from :func:`fxfuse.trace_model`).
        inputs: the example inputs it was traced with.
        config: the options (``lowering``, ``min_rows``, ``auto_rounds``).
        decisions: ``auto``'s recorded decisions to reuse (new ones are added).
        structural: also vectorise loops of identical rows (after the kinds).
        batched: which inputs carry the batch (``None``: every tensor input); a captured
            graph's lifted weights do not.
    """
    stage("matching loops")
    wmap, before = WeightMap(), _state(gm)
    sites: list[tuple[RowSite, ...]] = []
    claimed: frozenset[fx.Node] = frozenset()
    modes: set[str] = set()
    for fusion in fusions_for(config, structural=structural):
        existing = set(gm.graph.nodes)
        found = fusion.find(gm, Context(config, inputs, claimed, batched,
                                        first=sum(map(len, sites))))
        applied = apply_found(gm, fusion, found, config, decisions)
        claimed = frozenset(n for n in gm.graph.nodes if n in claimed or n not in existing)
        sites.append(applied.sites)
        wmap, modes = wmap + applied.weight_map, modes | applied.modes
    wmap = wmap + _finalize_keeping_tensors(gm, before, wmap)
    for mode in sorted(modes):
        fix_mode(gm, mode == "train")
    merged = _report(sites)
    return PassResult(merged, wmap, any(s.fused for s in merged))


def _report(per_fusion: list[tuple[RowSite, ...]]) -> tuple[RowSite, ...]:
    """The sites of every fusion, a loop two fusions found reported once."""
    merged: tuple[RowSite, ...] = ()
    for sites in per_fusion:
        merged = _merged(merged, list(sites))
    return merged


KEPT = "fxfuse_kept"


def _state(gm: fx.GraphModule) -> dict[str, Any]:
    return dict(gm.state_dict(keep_vars=True))


def _finalize_keeping_tensors(gm: fx.GraphModule, before: dict[str, Any],
                              wmap: WeightMap) -> WeightMap:
    """Lint, recompile, drop unused submodules; a tensor of the model that nothing maps
    and nothing reads any more (an unread batch counter of a fused row, say) is moved to
    a ``fxfuse_kept`` submodule rather than lost. Returns the map entries of those."""
    finalize_graph(gm)
    mapped = {p for e in wmap.entries for p in e.parts}
    lost = [k for k in before if k not in _state(gm) and k not in mapped]
    if not lost:
        return WeightMap()
    holder = getattr(gm, KEPT, None) or torch.nn.Module()
    entries = []
    for key in lost:
        name = f"t{len(holder.state_dict())}"
        value = before[key]
        if isinstance(value, torch.nn.Parameter):
            holder.register_parameter(name, value)
        else:
            holder.register_buffer(name, value)
        entries.append(WeightEntry(f"{KEPT}.{name}", (key,), 0, None, "same"))
    gm.add_submodule(KEPT, holder)
    return WeightMap(tuple(entries))


def _merged(kinds: tuple[RowSite, ...], rows: list[RowSite]) -> tuple[RowSite, ...]:
    """Two fusions' sites, a loop both found reported once: where the later fusion
    rewrote it, its record (and the earlier's too when that explains rows it left);
    where the earlier refused it and the later could fuse it, the later's (timed, or in
    ``inspect`` would fuse); else the earlier's."""
    by_join = {s.combine: s for s in rows}
    kept, dropped = [], set()
    for k in kinds:
        r = by_join.get(k.combine)
        if r is None or k.fused:
            kept.append(k)
        elif r.fused:
            if r.rows < k.rows:        # rows the later fusion left: the earlier says why
                kept.append(k)
        elif not r.fusable or k.fusable:
            kept.append(k)
            dropped.add(r.combine)
    return tuple(kept) + tuple(s for s in rows if s.combine not in dropped)
