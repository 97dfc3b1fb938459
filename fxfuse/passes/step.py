"""One fusion's sites, each chosen (``auto`` times it, or a forced option decides) and
rewritten in turn: the middle of the driver, for every fusion alike."""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from torch import fx

from ..check.decide import Choice, choose_among, untimed
from ..check.decisions import Decisions, choose_recorded
from ..config import FuseConfig
from ..errors import CannotTime, one_line
from ..match.sites import RowSite
from ..progress import stage
from ..weightmap import WeightMap
from .fusion import Found, Fusion

log = logging.getLogger("fxfuse")


@dataclasses.dataclass
class Applied:
    """What one fusion did: its sites (decided), the weight map of its rewrites, and the
    train/eval modes its rewrites fixed (``""``: none)."""

    sites: tuple[RowSite, ...]
    weight_map: WeightMap
    modes: frozenset[str]


def apply_found(gm: fx.GraphModule, fusion: Fusion, founds: Sequence[Found],
                config: FuseConfig, decisions: Decisions | None = None) -> Applied:
    """Choose a lowering for each of ``fusion``'s sites and rewrite ``gm`` in place; a
    site left as it was says why (its reason, or the timing that kept it)."""
    done, wmap, modes = [], WeightMap(), set()
    chosen: dict[tuple, Choice] = {}
    for found in founds:
        site = mode_refusal(found, config)
        if not site.fusable:
            done.append(site)
            continue
        key = fusion.share_key(found)      # a loop module applied again: the same choice,
        if key not in chosen:              # so the fused weights stay shared
            chosen[key] = _choose(gm, fusion, found, config, decisions)
        choice = chosen[key]
        lowering = "loop"
        if choice.lowering != "loop":
            lowering = fusion.label(found, choice.lowering)
            stage(f"rewriting {site.name} ({lowering})")
            wmap = wmap + fusion.rewrite(gm, found, choice.lowering)
            modes.add(getattr(found.plan, "fixed_mode", ""))
        timings = tuple((k if k == "loop" else fusion.label(found, k), v)
                        for k, v in choice.timings)
        done.append(dataclasses.replace(
            site, lowering=lowering, timings=timings,
            notes=site.notes + ((choice.note,) if choice.note else ()),
            decision=choice.to_dict() if config.lowering == "auto" else None))
    fusion.finish(gm)
    return Applied(tuple(done), wmap, frozenset(modes - {""}))


def mode_refusal(found: Found, config: FuseConfig) -> RowSite:
    """Rows that run batch norm or dropout where the kinds cannot keep both modes: fused
    (mode fixed) only when a lowering is forced; ``auto`` leaves them, saying how."""
    site, mode = found.site, getattr(found.plan, "fixed_mode", "")
    if not mode or not site.fusable:
        return site
    if config.lowering == "auto":
        return dataclasses.replace(site, match=dataclasses.replace(
            site.match, reason=f"a row runs differently in train and eval mode (batch norm "
            f"or dropout); lowering='vmap' fuses it with the model fixed to {mode} mode"))
    return dataclasses.replace(site, notes=site.notes + (
        f"the rows run batch norm or dropout: the fused model runs in {mode} mode only",))


def _choose(gm: fx.GraphModule, fusion: Fusion, found: Found, config: FuseConfig,
            decisions: Decisions | None) -> Choice:
    if config.lowering != "auto":
        return Choice(fusion.forced(found, config.lowering))
    return choose_recorded(gm, found.site, lambda: _timed(gm, fusion, found, config),
                           fusion.lowerings(found), decisions)


def _timed(gm: fx.GraphModule, fusion: Fusion, found: Found, config: FuseConfig) -> Choice:
    """Time the site's loop against its rewrites; a loop that cannot run alone is kept
    (with the reason); a rewrite that fails raises (the fusion names the site)."""
    try:
        calls = fusion.candidates(gm, found)
    except CannotTime as exc:
        reason = one_line(exc)
        log.info("%s: cannot time it alone (%s); %s", found.site.name, reason, fusion.kept)
        return untimed(f"{fusion.kept}: auto could not time it ({reason})")
    choice = choose_among(calls, rounds=config.auto_rounds)
    log.info("%s: %s", found.site.name, choice.rule())
    return choice
