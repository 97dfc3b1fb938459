"""The one driver: find with every fusion, choose a lowering per site, rewrite, clean up.

``fxfuse.fuse``, ``fxfuse inspect`` / ``fuse`` and the ``torch.compile`` backend all
run this. The row-op kinds (grouped convolutions, batched matmuls, sibling Linears)
go first, as the fast special cases; loops they leave are matched by structure and
vectorised. Under ``lowering="vmap"`` every loop is vectorised.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..check.decide import Choice, choose_among, untimed
from ..check.decisions import Decisions, choose_recorded
from ..config import FuseConfig
from ..errors import RewriteError
from ..match.find import find_row_sites
from ..progress import stage
from ..match.siblings import with_siblings
from ..match.sites import RowSite
from ..rewrite.rewriter import INSERTED_KEY, finalize_graph
from ..weightmap import WeightEntry, WeightMap
from ..trace.export import fix_mode
from ..structural.extract import CannotCut
from ..structural.fusion import RowsByStructure
from ..structural.plan import Refused
from .fusion import Context, Found
from .kinds import apply_sites

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
    """Every site every fusion finds, without changing ``gm`` (``fxfuse inspect``)."""
    kinds = () if config.lowering == "vmap" else \
        with_siblings(gm, find_row_sites(gm, min_rows=config.min_rows), min_rows=config.min_rows)
    claimed = frozenset()
    rows = RowsByStructure().find(gm, Context(config, inputs, claimed), first=len(kinds))
    return _merged(tuple(kinds), [f.site for f in rows])


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
    kinds: tuple[RowSite, ...] = ()
    wmap, before = WeightMap(), _state(gm)
    if config.lowering != "vmap":
        found = with_siblings(gm, find_row_sites(gm, min_rows=config.min_rows),
                              min_rows=config.min_rows)
        kinds, wmap = apply_sites(gm, found, config.lowering, auto_rounds=config.auto_rounds,
                                  decisions=decisions)
    fusion = RowsByStructure()
    claimed = frozenset(n for n in gm.graph.nodes if INSERTED_KEY in n.meta)  # the kinds' own
    rows = fusion.find(gm, Context(config, inputs, claimed, batched), first=len(kinds)) \
        if structural else []
    done, fixed = [], set()
    for found in rows:
        site = _mode_refusal(found, config)
        if site.fusable:
            choice = _choose(gm, fusion, found, config, decisions)
            site = dataclasses.replace(site, lowering=choice.lowering, timings=choice.timings,
                                       notes=site.notes + ((choice.note,) if choice.note else ()))
            if choice.lowering != "loop":
                stage(f"rewriting {site.name} ({choice.lowering})")
                wmap = wmap + fusion.rewrite(gm, found, choice.lowering)
                fixed.add(found.plan.fixed_mode)
        done.append(site)
    wmap = wmap + _finalize_keeping_tensors(gm, before, wmap)
    for mode in fixed - {""}:
        fix_mode(gm, mode == "train")
    sites = _merged(kinds, done)
    return PassResult(sites, wmap, any(s.fused for s in sites))


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


def _mode_refusal(found: Found, config: FuseConfig) -> RowSite:
    """Rows that run batch norm or dropout: fused (mode fixed) only when a lowering is
    forced; ``auto`` leaves them, saying how to fuse them."""
    site, mode = found.site, getattr(found.plan, "fixed_mode", "")
    if not mode or not site.fusable:
        return site
    if config.lowering == "auto":
        return dataclasses.replace(site, match=dataclasses.replace(
            site.match, reason=f"a row runs differently in train and eval mode (batch norm "
            f"or dropout); lowering='vmap' fuses it with the model fixed to {mode} mode"))
    return dataclasses.replace(site, notes=site.notes + (
        f"the rows run batch norm or dropout: the fused model runs in {mode} mode only",))


def _choose(gm: fx.GraphModule, fusion: RowsByStructure, found: Found,
            config: FuseConfig, decisions: Decisions | None) -> Choice:
    if config.lowering != "auto":
        return Choice("vmap")
    return choose_recorded(gm, found.site, lambda: _timed(gm, fusion, found, config),
                           fusion.lowerings(found), decisions)


def _timed(gm: fx.GraphModule, fusion: RowsByStructure, found: Found,
           config: FuseConfig) -> Choice:
    """Time the loop against its vectorised form; a loop that cannot run alone is kept
    (with the reason), a vectorised form that fails is a bug and raises."""
    name = "vmap"
    try:
        calls = fusion.candidates(gm, found)
    except (CannotCut, Refused) as exc:   # the loop alone cannot run: not timed, kept
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return untimed(f"kept as a loop: auto could not time it ({type(exc).__name__}: {text})")
    except Exception as exc:  # noqa: BLE001 - re-raised: a rewrite that fails is a bug
        raise RewriteError(f"{found.site.name}: the vmap rewrite of the rows at "
                           f"{found.site.where()} fails ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    try:
        for name, call in calls.items():
            call()
    except Exception as exc:  # noqa: BLE001 - re-raised: a broken rewrite is a bug
        raise RewriteError(f"{found.site.name}: the {name} rewrite of the rows at "
                           f"{found.site.where()} fails to run ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    return choose_among(calls, rounds=config.auto_rounds)


def _would_fuse(site: RowSite) -> bool:
    """Found fusable and not yet decided (``fxfuse inspect``)."""
    return site.fusable and not site.lowering


def _merged(kinds: tuple[RowSite, ...], rows: list[RowSite]) -> tuple[RowSite, ...]:
    """The kinds' sites and the structural ones, a loop both found reported once: where
    the structural fusion rewrote it (or, in ``inspect``, would, the kinds refusing), its
    record, and the kinds' too when their reason explains rows it left; else the kinds'."""
    by_join = {s.combine: s for s in rows}
    kept, dropped = [], set()
    for k in kinds:
        r = by_join.get(k.combine)
        if r is None or k.fused:
            kept.append(k)
        elif not (r.fused or _would_fuse(r) and not k.fusable):
            kept.append(k)
            dropped.add(r.combine)
        elif r.rows < k.rows:          # rows the structural fusion left: the kinds say why
            kept.append(k)
    return tuple(kept) + tuple(s for s in rows if s.combine not in dropped)
