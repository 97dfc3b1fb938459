"""``fxfuse.fuse``: trace, find, rewrite, verify, benchmark — one verb."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .running import quiet_import, running
quiet_import("torch.utils.benchmark")   # some torch builds print when it is first imported
from .check.bench import BenchResult, benchmark_models  # noqa: E402
from .config import FuseConfig, merge_config
from .errors import ConfigError, VerificationError
from .check.decisions import Decisions
from .check.report import format_report, slower_warning
from .match.sites import RowSite
from .passes.driver import run_pass
from .progress import stage, timed_call
from .passes.kinds import apply_sites
from .trace.prepare import copy_model, forward_copy, weight_norm_modules
from .trace.traced import Traced
from .trace.tracing import alias_note, distinct_inputs, trace, trace_general
from .check.fidelity import TraceCheck, check_trace, trace_table
from .check.verify import VerifyReport, verify_models
from .weightmap import WeightMap

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
        tracer: ``"symbolic"``, ``"export"`` or ``"realtensor"``.
        trace_check: the trace-fidelity check (traced graph vs original, before any
            rewrite) with notes on the trace and the batch sizes accepted (``None`` when
            ``verify=False``).
        notes: what the trace did that a user should know (also without ``verify``).
        decisions: ``auto``'s decisions, JSON-ready, keyed by each site's structure,
            shapes, dtype, device and torch version: pass them back as
            ``fuse(..., decisions=result.decisions)`` to reuse them without timing.
    """

    model: fx.GraphModule
    sites: tuple[RowSite, ...]
    weight_map: WeightMap
    verification: VerifyReport | None
    timing: BenchResult | None
    code_before: str
    tracer: str
    trace_check: TraceCheck | None = None
    notes: tuple[str, ...] = ()
    decisions: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch_sizes(self) -> tuple[int, ...] | None:
        """Batch sizes the returned model accepts: ``None`` for any (or not checked)."""
        return None if self.trace_check is None else self.trace_check.batch_sizes

    @property
    def changed(self) -> bool:
        """True when at least one loop was rewritten."""
        return any(s.fused for s in self.sites)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a user must not miss: the fused model measured slower than the original."""
        text = slower_warning(self.timing) if self.changed else ""
        return (text,) if text else ()

    @property
    def code_after(self) -> str:
        """The rewritten ``forward``."""
        return self.model.code

    def report(self) -> str:
        """A text table: sites, rows, conv settings, outcome, errors, timing, speedup."""
        text = format_report(self.sites, self.verification, self.timing)
        if self.trace_check is None and self.notes:
            return text + "\n" + "\n".join(f"note: {n}" for n in self.notes)
        return text + "\n" + trace_table(self.trace_check)

    def save(self, path: str, example_inputs: Sequence[Any] | None = None) -> Any:
        """Write the fused model to ``path`` and its weight map to ``path.map.json``, as
        ``fxfuse fuse -o`` does (``.pt2`` with a dynamic batch, ``.pt``/``.pth``
        pickled, ``.safetensors`` weights; both files or neither).

        Returns:
            A ``SavedModel`` (see :func:`fxfuse.io.save_result.save_result`).
        """
        from .io.save_result import save_result
        with running(None, "saving the model"):
            return save_result(self, path, example_inputs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        v, t = self.verification, self.timing
        return {
            "tracer": self.tracer,
            "sites": [s.to_dict() for s in self.sites],
            "verification": None if v is None else {
                "max_abs": v.max_abs, "max_rel": v.max_rel,
                "checks": [dataclasses.asdict(c) for c in v.checks], "skipped": list(v.skipped),
                "precision": v.precision, "notes": list(v.notes),
                "batch_sizes": list(v.batch_sizes), "batch_refused": list(v.batch_refused),
                "modes": list(v.modes)},
            "timing": None if t is None else dataclasses.asdict(t),
            "trace_check": None if self.trace_check is None else self.trace_check.to_dict(),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "decisions": self.decisions,
        }


class _Unset:
    """The default of :func:`fuse`'s keywords: "not given", so ``config`` decides."""

    def __repr__(self) -> str:
        return "<from config>"


_UNSET: Any = _Unset()


def fuse(model: torch.nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *,
         lowering: str = _UNSET, verify: bool = _UNSET, benchmark: bool = _UNSET,
         inplace: bool = _UNSET, min_rows: int = _UNSET, config: FuseConfig | None = None,
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
        config: a :class:`FuseConfig`; keywords given explicitly override its fields,
            keywords not given leave them as they are (defaults: ``lowering="auto"``,
            ``verify=True``, ``benchmark=True``, ``inplace=False``, ``min_rows=2``).
        **options: other :class:`FuseConfig` fields (``tracer``, ``concrete_args``,
            ``check_grads``, ``rtol``, ``atol``, ``bench_rounds``, ``auto_rounds``,
            ``decisions``: a previous ``result.decisions``, reused without timing).

    Returns:
        A :class:`FuseResult`. Nothing half-done is ever returned: any failure raises.

    Raises:
        TraceError: the model could not be traced (the message names the way out).
        VerificationError: the rewritten model's numbers differ; nothing is returned.
        ConfigError: an option has a bad value.
    """
    given = dict(lowering=lowering, verify=verify, benchmark=benchmark, inplace=inplace,
                 min_rows=min_rows)
    cfg = merge_config(config, **{k: v for k, v in given.items() if v is not _UNSET}, **options)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs, alias_notes = _example_inputs(example_inputs)
    with running(model) as shared_notes, timed_call():   # warnings muted, locks shared, OOM named
        if cfg.inplace:
            saved = _snapshot(model)
            try:
                return _fuse(model, inputs, cfg, alias_notes + shared_notes)
            except BaseException:
                _restore(saved)
                raise
        return _fuse(model, inputs, cfg, alias_notes + shared_notes)


def _example_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """One tensor or a tuple/list of inputs, cloned: the caller's tensors are never
    changed, even by a forward that writes into its input. Also a note when inputs
    shared memory (the clones are distinct, so the trace reads each argument)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(f"example_inputs must be a tensor or a tuple of the forward's "
                          f"positional inputs, got {type(example_inputs).__name__}")
    _, aliased = distinct_inputs(tuple(example_inputs))
    notes = (alias_note(aliased),) if aliased else ()
    return tuple(pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor)
                                 else v, list(example_inputs))), notes


def _snapshot(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter and buffer with a copy of its values (for ``inplace=True``)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return [(t, t.detach().clone()) for t in tensors.values()]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, values in saved:
            if tensor.shape == values.shape:
                tensor.copy_(values)
            else:
                tensor.data = values


def _fuse(model: torch.nn.Module, inputs: tuple[Any, ...], cfg: FuseConfig,
          notes: tuple[str, ...] = ()) -> FuseResult:
    if cfg.inplace:
        if weight_norm_modules(model):
            raise ConfigError("inplace=True cannot fold torch.nn.utils.weight_norm without "
                              "changing your model; use inplace=False")
        work, renames = model, WeightMap()
        reference = _copy(model) if cfg.verify else model
    else:
        work, copy_notes, renames = _copy(model, copy_model)
        reference = copy.deepcopy(work) if copy_notes else model   # weight norm folded
        notes += copy_notes
    stage("tracing")
    traced = trace(work, inputs, concrete_args=cfg.concrete_args, tracer=cfg.tracer)
    gm, notes = traced.gm, notes + traced.notes
    trace_check = _check_trace(model, gm, inputs, notes, cfg)
    code_before = gm.code
    decisions = Decisions(cfg.decisions)
    result = run_pass(gm, inputs, cfg, decisions=decisions)
    sites, wmap = result.sites, renames + traced.renames + result.weight_map
    if not any(s.fused for s in sites) and traced.tracer != "symbolic":
        traced, more = trace_general(work, traced, inputs, cfg.concrete_args)
        gm, notes = traced.gm, notes + more
        trace_check = _check_trace(model, gm, inputs, notes, cfg)
    verification = None
    if cfg.verify and any(s.fused for s in sites):
        traced, sites, wmap, verification = _verified(reference, traced, inputs, cfg,
                                                      decisions, sites, wmap, renames)
        gm = traced.gm
    timing = _benchmark(reference, gm, inputs, cfg)
    gm, sites, wmap, verification, timing, decisions = _slow_sites_reverted(
        reference, inputs, cfg, decisions, renames,
        (gm, sites, wmap, verification, timing, decisions))
    if any(s.fused for s in sites) and slower_warning(timing):
        log.warning("%s", slower_warning(timing))
    return FuseResult(gm, sites, wmap, verification, timing, code_before,
                      traced.tracer, trace_check, tuple(notes), decisions.to_dict())


def _benchmark(reference: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
               cfg: FuseConfig) -> BenchResult | None:
    """Time the original against the rewritten model, when asked. Timing runs the models
    many times (under inference_mode); copies keep their buffers (BatchNorm statistics in
    train mode) as they were, and share the parameters."""
    if not cfg.benchmark:
        return None
    stage("timing the original and the fused model")
    return benchmark_models(forward_copy(reference), forward_copy(gm), inputs,
                            rounds=cfg.bench_rounds)


def _verified(reference: torch.nn.Module, traced: Traced,
              inputs: tuple[Any, ...], cfg: FuseConfig, decisions: Decisions,
              sites: tuple[RowSite, ...], wmap: WeightMap, renames: WeightMap):
    """Verify; when the vectorised loops are what verification refuses, fuse without
    them and verify that (a refusal of the kinds' rewrites raises as before)."""
    try:
        return traced, sites, wmap, _verify(reference, traced, inputs, wmap, cfg)
    except VerificationError as exc:
        if not any(s.fused and s.loop_kind == "rows" for s in sites):
            raise
        traced, sites, wmap = _without_vectorised(reference, inputs, cfg, decisions, sites,
                                                  exc)
    wmap = renames + traced.renames + wmap
    verification = _verify(reference, traced, inputs, wmap, cfg) \
        if any(s.fused for s in sites) else None
    return traced, sites, wmap, verification


def _verify(reference: torch.nn.Module, traced: Traced, inputs: tuple[Any, ...],
            wmap: WeightMap, cfg: FuseConfig) -> VerifyReport:
    stage("verifying the rewrite")
    return verify_models(reference, traced.gm, inputs, weight_map=wmap,
                         check_grads=cfg.check_grads, rtol=cfg.rtol, atol=cfg.atol,
                         exported=traced.exported)


def _without_vectorised(reference: torch.nn.Module, inputs: tuple[Any, ...], cfg: FuseConfig,
                        decisions: Decisions, sites: tuple[RowSite, ...],
                        exc: VerificationError):
    """The pass again without the vectorised loops, whose numbers verification refused
    (a float64 buffer fed by float32 rows, say): the kinds' rewrites are kept, and each
    vectorised loop is reported kept, with the reason."""
    log.warning("verification refused the vectorised loops (%s); fusing without them", exc)
    traced = trace(_copy(reference), inputs, concrete_args=cfg.concrete_args,
                   tracer=cfg.tracer)      # a fresh copy: the first rewrite changed its modules
    result = run_pass(traced.gm, inputs, cfg, decisions=decisions, structural=False)
    note = f"vectorised, but verification refused the result ({exc}); kept as a loop"
    reverted = {s.combine: s for s in sites if s.fused and s.loop_kind == "rows"}
    again = tuple(dataclasses.replace(s, notes=s.notes + (note,)) if s.combine in reverted
                  else s for s in result.sites)
    known = {s.combine for s in again}
    kept = tuple(dataclasses.replace(s, lowering="loop", notes=s.notes + (note,))
                 for c, s in reverted.items() if c not in known)
    return traced, again + kept, result.weight_map


def _slow_sites_reverted(reference: torch.nn.Module,
                         inputs: tuple[Any, ...], cfg: FuseConfig, decisions: Decisions,
                         renames: WeightMap, first: tuple):
    """The fused model measured slower than the original beyond the spread: time each
    fused site again (its decision set aside; the loops kept stay kept), run the pass
    again, so a site whose rewrite does not hold up gets its loop back, verify and time
    that, and return the better of the two (gm, sites, wmap, verification, timing,
    decisions); ``first`` as it is unless ``auto`` fused a model measured slower."""
    timing = first[4]
    if cfg.lowering != "auto" or cfg.inplace or not any(s.fused for s in first[1]) \
            or not slower_warning(timing):
        return first
    log.warning("the fused model measured slower than the original (%.2fx); timing each "
                "fused site again", timing.speedup)
    again = Decisions({**decisions.to_dict(), "entries": {
        k: e for k, e in decisions.to_dict()["entries"].items() if e["lowering"] == "loop"}})
    traced = trace(_copy(reference), inputs, concrete_args=cfg.concrete_args,
                   tracer=cfg.tracer)      # a fresh copy: the first rewrite changed its modules
    result = run_pass(traced.gm, inputs, cfg, decisions=again)
    sites = _noted_reverts(first[1], result.sites, timing.speedup)
    wmap = renames + traced.renames + result.weight_map
    verification = _verify(reference, traced, inputs, wmap, cfg) \
        if cfg.verify and any(s.fused for s in sites) else None
    retimed = benchmark_models(forward_copy(reference), forward_copy(traced.gm), inputs,
                               rounds=cfg.bench_rounds)
    if retimed.speedup < timing.speedup:
        return first
    return traced.gm, sites, wmap, verification, retimed, again


def _noted_reverts(before: tuple[RowSite, ...], after: tuple[RowSite, ...],
                   speedup: float) -> tuple[RowSite, ...]:
    """``after``, each site fused in ``before`` but not now noted as reverted."""
    fused_before = {s.combine for s in before if s.fused}
    note = (f"reverted to the loop: the fused model measured {speedup:.2f}x the original "
            "end to end, and timed again this site's rewrite did not hold up")
    return tuple(dataclasses.replace(s, notes=s.notes + (note,))
                 if s.combine in fused_before and not s.fused else s for s in after)


def _check_trace(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                 notes: tuple[str, ...], cfg: FuseConfig) -> TraceCheck | None:
    """Part one of verification: the unrewritten trace against the original."""
    if not cfg.verify:
        return None
    stage("checking the trace against the model")
    return check_trace(model, gm, inputs, notes=notes, rtol=cfg.rtol, atol=cfg.atol)


def _copy(model: torch.nn.Module, how: Any = copy.deepcopy) -> Any:
    """``how(model)`` (a deep copy); a model nested too deeply to copy is a ConfigError."""
    try:
        return how(model)
    except RecursionError:
        raise ConfigError(f"cannot copy the {type(model).__name__}: it is nested too deeply "
                          "for Python's recursion limit; flatten its module tree, or pass "
                          "inplace=True with verify=False") from None


__all__ = ["FuseResult", "fuse", "apply_sites"]
