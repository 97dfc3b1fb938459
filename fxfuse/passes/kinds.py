"""The row-op kinds as one fusion step: grouped convolutions, batched matmuls, dense sums,
folded batches and sibling Linears, each site chosen (``auto``) and rewritten in turn."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import fx

from ..check.auto import Choice, choose_lowering, choose_siblings
from ..check.decisions import Decisions, choose_recorded
from ..config import merge_config
from ..match.siblings import KIND as SIBLINGS
from ..match.sites import RowSite, twin_of
from ..progress import stage
from ..rewrite.copies import drop_needless_copies, restore_output_layout
from ..rewrite.rewriter import LOWERINGS, finalize_graph, lowerings_for, rewrite_site
from ..rewrite.siblings import rewrite_siblings
from ..rewrite.simplify import simplify_layout
from ..weightmap import WeightMap


def apply_sites(gm: fx.GraphModule, sites: Sequence[RowSite],
                lowering: str = "grouped", *, auto_rounds: int = 9,
                decisions: Decisions | None = None
                ) -> tuple[tuple[RowSite, ...], WeightMap]:
    """Rewrite every fusable site of ``gm`` in turn (in place).

    Args:
        gm: the traced module the sites were found in.
        sites: from :func:`find_row_sites`.
        lowering: ``"grouped"``, ``"grouped2d"`` or ``"auto"`` (measure per site).
        auto_rounds: timing rounds per site for ``"auto"``.
        decisions: recorded decisions to reuse under ``"auto"`` (new ones are added).

    Returns:
        The sites with ``lowering`` (and, for ``"auto"``, ``timings``) filled in, and the
        combined weight map. Under ``"auto"`` a site that could not be timed is kept as
        a loop, with the reason in its ``notes``.
    """
    lowering = merge_config(lowering=lowering, auto_rounds=auto_rounds).lowering
    done, wmap = [], WeightMap()
    chosen_for: dict[tuple, Choice] = {}
    for site in sites:
        if not site.fusable:
            done.append(site)
            continue
        twin = twin_of(site)                   # a loop module applied again: same choice,
        if lowering == "auto" and twin in chosen_for:   # so the fused weights stay shared
            choice = chosen_for[twin]
        elif lowering == "auto":
            choice = _auto_choice(gm, site, auto_rounds, decisions)
        else:
            choice = Choice(lowering)
        chosen_for[twin] = choice
        timings = tuple((_label(site, k) if k in LOWERINGS else k, v) for k, v in choice.timings)
        notes = site.notes + ((choice.note,) if choice.note else ())
        decision = choice.to_dict() if lowering == "auto" else None
        if choice.lowering == "loop":
            done.append(dataclasses.replace(site, lowering="loop", timings=timings,
                                            notes=notes, decision=decision))
            continue
        stage(f"rewriting {site.name} ({_label(site, choice.lowering)})")
        if site.loop_kind == SIBLINGS:         # one Linear, whatever lowering was asked
            wmap = wmap + rewrite_siblings(gm, site, finalize=False)
        else:
            wmap = wmap + rewrite_site(gm, site, choice.lowering, finalize=False)
        done.append(dataclasses.replace(
            site, lowering=_label(site, choice.lowering), timings=timings, notes=notes,
            decision=decision))
    simplify_layout(gm)
    drop_needless_copies(gm)
    restore_output_layout(gm)
    finalize_graph(gm)
    return tuple(done), wmap


def _auto_choice(gm: fx.GraphModule, site: RowSite, rounds: int,
                 decisions: Decisions | None) -> Choice:
    """``auto``'s choice for ``site``: recorded in ``decisions``, or measured."""
    if site.loop_kind == SIBLINGS:
        return choose_recorded(gm, site, lambda: choose_siblings(gm, site, rounds=rounds),
                               (SIBLINGS,), decisions)
    return choose_recorded(gm, site, lambda: choose_lowering(gm, site, rounds=rounds),
                           lowerings_for(site, LOWERINGS), decisions)


def _label(site: RowSite, lowering: str) -> str:
    """What the report calls the rewrite of ``site``."""
    if site.loop_kind == SIBLINGS:
        return SIBLINGS
    if site.shared_module:
        return "batched"
    if site.reduce:
        return "dense"
    return "bmm" if site.family == "linear" else lowering
