"""What a fusion is: find sites, list its lowerings, cut a site out, rewrite it.

A fusion finds its sites (fusable or with the reason they are not) without changing the
graph, on nodes no earlier fusion claimed; the driver chooses a lowering per site and
calls ``rewrite``. New capabilities are new fusions in :data:`REGISTRY`, not branches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from torch import fx

from ..config import FuseConfig
from ..match.sites import RowSite
from ..weightmap import WeightMap


@dataclass
class Found:
    """A site as its fusion found it: the common record (``site``, a :class:`RowSite`)
    and the plan private to the fusion (node references, not names)."""

    site: RowSite
    plan: Any = None
    nodes: frozenset[fx.Node] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Context:
    """What a fusion's ``find`` may read: the options, the example inputs, the nodes
    earlier fusions claimed, and which inputs carry the batch (a captured graph's
    lifted weights do not)."""

    config: FuseConfig
    inputs: tuple[Any, ...]
    claimed: frozenset[fx.Node] = frozenset()
    batched: tuple[bool, ...] | None = None  # which inputs carry the batch (None: all)


class Fusion(Protocol):
    """One kind of rewrite."""

    name: str

    def find(self, gm: fx.GraphModule, ctx: Context) -> list[Found]:
        """Every site in ``gm`` (pure: the graph is not changed)."""

    def lowerings(self, found: Found) -> tuple[str, ...]:
        """The rewrites this site can get, fastest-expected first."""

    def candidates(self, gm: fx.GraphModule, found: Found) -> dict[str, Callable[[], Any]]:
        """Zero-argument calls to time: ``"loop"`` and one per lowering (``auto``)."""

    def rewrite(self, gm: fx.GraphModule, found: Found, lowering: str) -> WeightMap:
        """Rewrite one site in place; raises :class:`~fxfuse.errors.RewriteError`."""
