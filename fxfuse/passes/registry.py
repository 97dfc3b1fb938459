"""Every fusion, in the order the driver runs them: the kinds first (the fast special
cases, timed under ``auto`` against the same rows vectorised), then the structural
fusion for any loop of identical rows they leave."""
from __future__ import annotations

from ..config import FuseConfig
from ..structural.fusion import RowsByStructure
from .fusion import Fusion
from .kinds import RowLoops, SiblingLinears

REGISTRY: tuple[type, ...] = (RowLoops, SiblingLinears, RowsByStructure)


def fusions_for(config: FuseConfig, *, structural: bool = True) -> tuple[Fusion, ...]:
    """The fusions a pass under ``config`` runs: under ``lowering="vmap"`` only the
    structural one (every loop vectorised); ``structural=False`` leaves it out."""
    chosen = []
    for kind in REGISTRY:
        if kind is RowsByStructure and not structural:
            continue
        if kind is not RowsByStructure and config.lowering == "vmap":
            continue
        chosen.append(RowLoops(vectorised=structural) if kind is RowLoops else kind())
    return tuple(chosen)
