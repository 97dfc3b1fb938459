"""Loops of identical rows, by structure, vectorised with ``torch.func.vmap`` (a Fusion)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from ..errors import CannotTime, RewriteError, one_line
from ..match.sites import RowMatch, RowSite
from ..passes.fusion import Context, Found
from ..weightmap import WeightMap
from .extract import candidates
from .find import Loop, find_loops
from .plan import Refused
from .rewrite import rewrite_loop


def _steps(loop: Loop, gm: fx.GraphModule) -> tuple[str, ...]:
    steps = []
    for node in loop.plan.bodies[0]:
        if node.op == "call_module":
            steps.append(type(gm.get_submodule(str(node.target))).__name__)
        elif node.op == "get_attr":
            steps.append("parameter")
        else:
            steps.append(getattr(node.target, "__name__", str(node.target)))
    return tuple(steps)


def _heads(loop: Loop) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names, targets = [], []
    for body in loop.plan.bodies:
        layer = next((n for n in body if n.op in ("call_module", "get_attr")), body[0])
        names.append(layer.name)
        targets.append(str(layer.target) if layer.op != "call_function" else layer.name)
    return tuple(names), tuple(targets)


def site_of(loop: Loop, gm: fx.GraphModule, name: str) -> RowSite:
    """The report's record of a loop."""
    join = loop.join
    if loop.plan is None:
        match = RowMatch(name, join.node.name, join.kind,
                         convs=tuple(t.name for t in join.tensors), loop_kind="rows",
                         reason=loop.reason)
        return RowSite(match)
    convs, targets = _heads(loop)
    match = RowMatch(name, join.node.name, join.kind, convs=convs, targets=targets,
                     steps=_steps(loop, gm), groups=(tuple(loop.plan.rows),),
                     loop_kind="rows", reason=loop.reason)
    return RowSite(match)


class RowsByStructure:
    """Rows that are the same code with different parameters: any op vmap can batch."""

    name = "rows"
    kept = "kept as a loop"

    def find(self, gm: fx.GraphModule, ctx: Context) -> list[Found]:
        loops = find_loops(gm, ctx.inputs, set(ctx.claimed), ctx.config.min_rows,
                           batched=ctx.batched)
        found = []
        for k, loop in enumerate(loops):
            nodes = frozenset(loop.plan.nodes()) if loop.plan is not None else frozenset()
            found.append(Found(site_of(loop, gm, f"site{ctx.first + k}"), loop, nodes))
        return found

    def lowerings(self, found: Found) -> tuple[str, ...]:
        return ("vmap",) if found.site.fusable else ()

    def forced(self, found: Found, lowering: str) -> str:
        return "vmap"

    def label(self, found: Found, lowering: str) -> str:
        return lowering

    def share_key(self, found: Found) -> tuple:
        return ("site", found.site.name)

    def candidates(self, gm: fx.GraphModule, found: Found) -> dict[str, Callable[[], Any]]:
        """The rows alone and vectorised, each run once; raises :class:`CannotTime` when
        the rows cannot run alone, :class:`RewriteError` when the vectorised form fails."""
        try:
            loop, fused, inputs = candidates(gm, found.plan)
        except Refused as exc:
            raise CannotTime(f"{type(exc).__name__}: {one_line(exc)[:160]}") from exc
        except CannotTime:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised: a rewrite that fails is a bug
            raise self._failure(found, "fails", exc) from exc
        calls = {"loop": _call(loop, inputs), "vmap": _call(fused, inputs)}
        try:
            calls["vmap"]()
        except Exception as exc:  # noqa: BLE001 - re-raised: a broken rewrite is a bug
            raise self._failure(found, "fails to run", exc) from exc
        return calls

    @staticmethod
    def _failure(found: Found, what: str, exc: Exception) -> RewriteError:
        return RewriteError(f"{found.site.name}: the vmap rewrite of the rows at "
                            f"{found.site.where()} {what} ({type(exc).__name__}: "
                            f"{one_line(exc)[:160]})")

    def rewrite(self, gm: fx.GraphModule, found: Found, lowering: str) -> WeightMap:
        return rewrite_loop(gm, found.plan)

    def finish(self, gm: fx.GraphModule) -> None:
        """Nothing: the driver's final clean-up is enough."""


def _call(module: fx.GraphModule, inputs: tuple[Any, ...]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return module(*inputs)
    return run
