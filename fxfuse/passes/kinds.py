"""The row-op kinds as two fusions: loops of per-row layers (grouped convolutions,
batched matmuls, dense sums, folded batches) and sibling Linears (one Linear for several
reading one input). They are the fast special cases; the structural fusion takes the
loops they leave."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import fx

from ..check.auto import sibling_timing_calls, timing_calls
from ..errors import CannotTime, one_line
from ..check.decisions import Decisions
from ..config import merge_config
from ..match.find import find_row_sites
from ..match.siblings import KIND as SIBLINGS, find_sibling_sites
from ..match.sites import RowSite, twin_of
from ..rewrite.copies import drop_needless_copies, restore_output_layout
from ..rewrite.rewriter import LOWERINGS, finalize_graph, lowerings_for, node_index, rewrite_site
from ..rewrite.siblings import rewrite_siblings
from ..rewrite.simplify import simplify_layout
from ..structural.fusion import RowsByStructure
from ..weightmap import WeightMap
from .fusion import Context, Found
from .step import apply_found

log = logging.getLogger("fxfuse")
VMAP = "vmap"


@dataclass(frozen=True)
class KindsPlan:
    """A kinds site and, where ``auto`` may time it too, the same rows as the
    structural fusion found them (their vectorised form)."""

    site: RowSite
    vectorised: Found | None = None


def site_nodes(gm: fx.GraphModule, site: RowSite) -> frozenset[fx.Node]:
    """The graph nodes a kinds site names: its layers, per-row ops, reads and join (not
    the tensor it reads, which other sites may read too)."""
    index = node_index(gm.graph)
    names = (*site.input_nodes, *site.convs, *(n for c in site.chains for n in c),
             *site.output_nodes, site.combine)
    return frozenset(index[n] for n in names if n in index)


def _found(gm: fx.GraphModule, site: RowSite) -> Found:
    return Found(site, KindsPlan(site), site_nodes(gm, site))


def _unclaimed(gm: fx.GraphModule, sites: Sequence[RowSite], ctx: Context) -> list[Found]:
    found = [_found(gm, s) for s in sites]
    return [f for f in found if not f.nodes & ctx.claimed]


class _Kinds:
    """What the two kinds fusions share: their clean-up and the forced option."""

    kept = "kept as a loop"

    def forced(self, found: Found, lowering: str) -> str:
        return lowering

    def share_key(self, found: Found) -> tuple:
        return twin_of(found.site)

    def finish(self, gm: fx.GraphModule) -> None:
        simplify_layout(gm)
        drop_needless_copies(gm)
        restore_output_layout(gm)
        finalize_graph(gm)


class RowLoops(_Kinds):
    """Loops of per-row layers whose every op is a known kind. Under ``auto`` the rows'
    vectorised form (``vmap``, from the structural fusion) is timed beside the kinds'
    lowerings, unless ``vectorised=False``."""

    name = "row loops"

    def __init__(self, vectorised: bool = True) -> None:
        self.vectorised = vectorised

    def find(self, gm: fx.GraphModule, ctx: Context) -> list[Found]:
        found = _unclaimed(gm, find_row_sites(gm, min_rows=ctx.config.min_rows), ctx)
        if self.vectorised and ctx.config.lowering == "auto" and any(
                f.site.fusable for f in found):
            found = _with_vectorised(gm, found, ctx)
        return found

    def lowerings(self, found: Found) -> tuple[str, ...]:
        extra = (VMAP,) if found.plan.vectorised is not None else ()
        return lowerings_for(found.site, LOWERINGS) + extra

    def candidates(self, gm: fx.GraphModule, found: Found) -> dict[str, Callable[[], Any]]:
        calls = timing_calls(gm, found.site, LOWERINGS)
        rows = found.plan.vectorised
        if rows is not None:
            try:
                calls[VMAP] = RowsByStructure().candidates(gm, rows)[VMAP]
            except CannotTime as exc:        # the kinds' cut-out ran: time without it
                log.info("%s: vmap not timed (%s)", found.site.name, one_line(exc))
        return calls

    def rewrite(self, gm: fx.GraphModule, found: Found, lowering: str) -> WeightMap:
        if lowering == VMAP:
            return RowsByStructure().rewrite(gm, found.plan.vectorised, VMAP)
        return rewrite_site(gm, found.site, lowering, finalize=False)

    def label(self, found: Found, lowering: str) -> str:
        site = found.site
        if lowering not in LOWERINGS:
            return lowering
        if site.shared_module:
            return "batched"
        if site.reduce:
            return "dense"
        return "bmm" if site.family == "linear" else lowering


def _with_vectorised(gm: fx.GraphModule, found: list[Found], ctx: Context) -> list[Found]:
    """``found`` with each fusable site's rows as the structural fusion sees them, when
    it finds the same rows (same join, same number of rows, both modes kept)."""
    by_join = {}
    for rows in RowsByStructure().find(gm, ctx):
        plan = rows.plan
        if rows.site.fusable and not getattr(plan, "fixed_mode", ""):
            by_join[rows.site.combine] = rows
    applied = Counter(twin_of(f.site) for f in found)   # a loop module applied twice keeps
    out = []                                             # one set of fused weights: no vmap
    for f in found:
        rows = by_join.get(f.site.combine) if f.site.fusable else None
        if rows is not None and rows.site.rows == f.site.rows and applied[twin_of(f.site)] == 1:
            f = Found(f.site, KindsPlan(f.site, rows), f.nodes)
        out.append(f)
    return out


class SiblingLinears(_Kinds):
    """Linears reading one input: one Linear, the weights concatenated."""

    name = "siblings"
    kept = "kept separate"

    def find(self, gm: fx.GraphModule, ctx: Context) -> list[Found]:
        sites = find_sibling_sites(gm, min_rows=ctx.config.min_rows,
                                   claimed=ctx.claimed, first=ctx.first)
        return _unclaimed(gm, sites, ctx)

    def lowerings(self, found: Found) -> tuple[str, ...]:
        return (SIBLINGS,)

    def forced(self, found: Found, lowering: str) -> str:
        return SIBLINGS                         # one Linear, whatever lowering was asked

    def candidates(self, gm: fx.GraphModule, found: Found) -> dict[str, Callable[[], Any]]:
        return sibling_timing_calls(gm, found.site)

    def rewrite(self, gm: fx.GraphModule, found: Found, lowering: str) -> WeightMap:
        return rewrite_siblings(gm, found.site, finalize=False)

    def label(self, found: Found, lowering: str) -> str:
        return SIBLINGS


def apply_sites(gm: fx.GraphModule, sites: Sequence[RowSite],
                lowering: str = "grouped", *, auto_rounds: int = 9,
                decisions: Decisions | None = None
                ) -> tuple[tuple[RowSite, ...], WeightMap]:
    """Rewrite every fusable site of ``gm`` in turn (in place).

    Args:
        gm: the traced module the sites were found in.
        sites: from :func:`find_row_sites` (and sibling sites).
        lowering: ``"grouped"``, ``"grouped2d"`` or ``"auto"`` (measure per site).
        auto_rounds: timing rounds per site for ``"auto"``.
        decisions: recorded decisions to reuse under ``"auto"`` (new ones are added).

    Returns:
        The sites with ``lowering`` (and, for ``"auto"``, ``timings``) filled in, and the
        combined weight map. Under ``"auto"`` a site that could not be timed is kept as
        a loop, with the reason in its ``notes``.
    """
    config = merge_config(lowering=lowering, auto_rounds=auto_rounds)
    rows = [s for s in sites if s.loop_kind != SIBLINGS]
    siblings = [s for s in sites if s.loop_kind == SIBLINGS]
    done: dict[str, RowSite] = {}
    wmap = WeightMap()
    for fusion, part in ((RowLoops(vectorised=False), rows), (SiblingLinears(), siblings)):
        applied = apply_found(gm, fusion, [_found(gm, s) for s in part], config, decisions)
        done.update((s.name, s) for s in applied.sites)
        wmap = wmap + applied.weight_map
    return tuple(done[s.name] for s in sites), wmap

