"""What a fusion is: find sites, list its lowerings, cut a site out, rewrite it.

A fusion finds its sites (fusable or with the reason they are not) without changing the
graph, on nodes no earlier fusion claimed; the driver chooses a lowering per site and
calls ``rewrite``. New capabilities are new fusions in
:data:`fxfuse.passes.registry.REGISTRY`, not branches.

The claiming rule, one for all fusions: a node an earlier fusion's rewrite inserted is
claimed and no later fusion may take it (``fxfuse inspect``, which rewrites nothing,
counts the nodes of the sites earlier fusions would rewrite). A loop an earlier fusion
left (refused, or measured slower) is free for the next one.
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
    first: int = 0                            # the number of the first site found


class Fusion(Protocol):
    """One kind of rewrite."""

    name: str
    kept: str      # what a site ``auto`` cannot time is said to be ("kept as a loop")

    def find(self, gm: fx.GraphModule, ctx: Context) -> list[Found]:
        """Every site in ``gm`` on unclaimed nodes, named from ``ctx.first`` on (pure:
        the graph is not changed)."""

    def lowerings(self, found: Found) -> tuple[str, ...]:
        """The rewrites this site can get, fastest-expected first."""

    def forced(self, found: Found, lowering: str) -> str:
        """The rewrite a site gets under the forced option ``lowering``."""

    def candidates(self, gm: fx.GraphModule, found: Found) -> dict[str, Callable[[], Any]]:
        """The site cut out (``"loop"``) and each lowering of it, as zero-argument calls
        to time, each rewrite run once. Raises :class:`~fxfuse.errors.CannotTime` when
        the loop cannot run alone, :class:`~fxfuse.errors.RewriteError` (or
        ``InternalError``) when a rewrite fails."""

    def rewrite(self, gm: fx.GraphModule, found: Found, lowering: str) -> WeightMap:
        """Rewrite one site in place; raises :class:`~fxfuse.errors.RewriteError`."""

    def label(self, found: Found, lowering: str) -> str:
        """What the report calls ``lowering`` of this site."""

    def share_key(self, found: Found) -> tuple:
        """Sites with one key get one choice (one loop module applied twice)."""

    def finish(self, gm: fx.GraphModule) -> None:
        """Clean up after this fusion's rewrites (layout, copies)."""
