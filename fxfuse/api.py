"""``fxfuse.fuse``: trace, find, rewrite, verify, benchmark — one verb."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from .check.bench import BenchResult, benchmark_models
from .config import FuseConfig
from .errors import ConfigError
from .match.find import find_row_sites
from .check.auto import choose_lowering
from .check.report import format_report
from .rewrite.rewriter import finalize_graph, rewrite_site
from .rewrite.simplify import simplify_layout
from .match.sites import RowSite
from .trace.tracing import TRACER_KEY, trace_model
from .check.verify import VerifyReport, verify_models
from .rewrite.weights import WeightMap

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class FuseResult:
    """What :func:`fuse` did.

    Attributes:
        model: the rewritten ``torch.fx.GraphModule`` (stock torch modules and ops only).
        sites: one :class:`RowSite` per loop found: where, rows, conv, what was done or why not.
        weight_map: maps the original state_dict to the fused one and back.
        verification: the numerical checks (``None`` when ``verify=False``).
        timing: original vs fused timing (``None`` when ``benchmark=False``).
        code_before: the traced ``forward`` before the rewrite.
        tracer: ``"symbolic"`` or ``"export"``.
    """

    model: fx.GraphModule
    sites: tuple[RowSite, ...]
    weight_map: WeightMap
    verification: VerifyReport | None
    timing: BenchResult | None
    code_before: str
    tracer: str

    @property
    def changed(self) -> bool:
        """True when at least one loop was rewritten."""
        return any(s.fused for s in self.sites)

    @property
    def code_after(self) -> str:
        """The rewritten ``forward``."""
        return self.model.code

    def report(self) -> str:
        """A text table: sites, rows, conv settings, outcome, errors, timing, speedup."""
        return format_report(self.sites, self.verification, self.timing)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        v, t = self.verification, self.timing
        return {
            "tracer": self.tracer,
            "sites": [s.to_dict() for s in self.sites],
            "verification": None if v is None else {
                "max_abs": v.max_abs, "max_rel": v.max_rel,
                "checks": [dataclasses.asdict(c) for c in v.checks], "skipped": list(v.skipped)},
            "timing": None if t is None else dataclasses.asdict(t),
        }


def fuse(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *,
         lowering: str = "auto", verify: bool = True, benchmark: bool = True,
         inplace: bool = False, min_rows: int = 2, config: FuseConfig | None = None,
         **options: Any) -> FuseResult:
    """Rewrite every per-row ``Conv1d`` loop of ``model`` into one convolution.

    Args:
        model: the model; left untouched unless ``inplace=True``.
        example_inputs: a tuple of positional inputs (or one tensor) for one forward call.
        lowering: ``"grouped"``, ``"grouped2d"`` or ``"auto"`` (see :class:`FuseConfig`).
        verify: compare with the original on the example inputs, another batch size and
            (train mode) gradients; raise :class:`VerificationError` on a mismatch.
        benchmark: time original vs rewritten, interleaved.
        inplace: do not deep-copy ``model`` first (its submodules are reused and changed).
        min_rows: leave loops with fewer rows alone.
        config: a :class:`FuseConfig`; keyword options override its fields.
        **options: other :class:`FuseConfig` fields (``tracer``, ``concrete_args``,
            ``check_grads``, ``rtol``, ``atol``, ``bench_rounds``).

    Returns:
        A :class:`FuseResult`. Nothing half-done is ever returned: any failure raises.

    Raises:
        TraceError: the model could not be traced (the message names the way out).
        VerificationError: the rewritten model's numbers differ; nothing is returned.
        ConfigError: an option has a bad value.
    """
    fields = {f.name for f in dataclasses.fields(FuseConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; options are {', '.join(sorted(fields))}")
    cfg = dataclasses.replace(config or FuseConfig(), lowering=lowering, verify=verify,
                              benchmark=benchmark, inplace=inplace, min_rows=min_rows, **options)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    reference = model
    if cfg.inplace:
        work = model
        reference = _copy(model) if cfg.verify else model
    else:
        work = _copy(model)
    gm = trace_model(work, inputs, concrete_args=cfg.concrete_args, tracer=cfg.tracer)
    code_before = gm.code
    sites, wmap = apply_sites(gm, find_row_sites(gm, min_rows=cfg.min_rows), cfg.lowering)
    verification = None
    if cfg.verify and any(s.fused for s in sites):
        verification = verify_models(reference, gm, inputs, weight_map=wmap,
                                     check_grads=cfg.check_grads, rtol=cfg.rtol, atol=cfg.atol)
    # Timing runs the models many times; copies keep their buffers (BatchNorm statistics
    # in train mode) as they were.
    timing = benchmark_models(copy.deepcopy(reference), copy.deepcopy(gm), inputs,
                              rounds=cfg.bench_rounds) if cfg.benchmark else None
    return FuseResult(gm, sites, wmap, verification, timing, code_before,
                      getattr(gm, TRACER_KEY, "symbolic"))


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)``; a model nested too deeply to copy is a ConfigError."""
    try:
        return copy.deepcopy(model)
    except RecursionError:
        raise ConfigError(f"cannot copy the {type(model).__name__}: it is nested too deeply "
                          "for Python's recursion limit; flatten its module tree, or pass "
                          "inplace=True with verify=False") from None


def apply_sites(gm: fx.GraphModule, sites: Sequence[RowSite],
                lowering: str = "grouped") -> tuple[tuple[RowSite, ...], WeightMap]:
    """Rewrite every fusable site of ``gm`` in turn (in place).

    Args:
        gm: the traced module the sites were found in.
        sites: from :func:`find_row_sites`.
        lowering: ``"grouped"``, ``"grouped2d"`` or ``"auto"`` (measure per site).

    Returns:
        The sites with ``lowering`` (and, for ``"auto"``, ``timings``) filled in, and the
        combined weight map.
    """
    done, wmap = [], WeightMap()
    chosen_for: dict[tuple, str] = {}
    for site in sites:
        if not site.fusable:
            done.append(site)
            continue
        twin = (site.targets, site.steps)      # a loop module applied again: same choice,
        if lowering == "auto" and twin in chosen_for:   # so the fused weights stay shared
            chosen, timings = chosen_for[twin], ()
        elif lowering == "auto":
            chosen, timings = choose_lowering(gm, site)
        else:
            chosen, timings = lowering, ()
        chosen_for[twin] = chosen
        if chosen == "loop":
            done.append(dataclasses.replace(site, lowering="loop", timings=timings))
            continue
        wmap = wmap + rewrite_site(gm, site, chosen, finalize=False)
        done.append(dataclasses.replace(
            site, lowering=_label(site, chosen), timings=timings))
    simplify_layout(gm)
    finalize_graph(gm)
    return tuple(done), wmap


def _label(site: RowSite, lowering: str) -> str:
    """What the report calls the rewrite of ``site``."""
    if site.shared_module:
        return "batched"
    if site.reduce:
        return "dense"
    return "bmm" if site.family == "linear" else lowering
