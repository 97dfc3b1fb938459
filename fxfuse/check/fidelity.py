"""Trace fidelity: does the traced, unrewritten graph compute what the model does?

Run before any rewrite, so a mismatch is blamed on the trace (an aliased input read
once, a value or a shape baked in), never on the rewrite. The graph is compared with
the original model on the example inputs and on fresh inputs of another batch size,
with a distinct tensor for every argument. A graph that refuses the other batch size
where the original takes it is not an error: it is reported as accepting the traced
batch size only (``batch_sizes``), and is checked on fresh inputs of that size instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import TraceError, VerificationError, one_line
from .runs import fresh_inputs, random_nodes, run
from .verify import Check, compare
from ..trace.prepare import forward_copy

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class TraceCheck:
    """The trace-fidelity part of verification.

    Attributes:
        checks: the comparisons of the traced graph with the original model.
        skipped: checks that could not run, with why.
        notes: what the trace did that a user should know (aliased inputs traced on
            copies, optional arguments bound, the tracer, what the returned model is).
        batch_sizes: the batch sizes the returned model accepts; ``None`` for any.
    """

    checks: tuple[Check, ...] = ()
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [{"name": c.name, "max_abs": c.max_abs, "max_rel": c.max_rel}
                           for c in self.checks],
                "skipped": list(self.skipped), "notes": list(self.notes),
                "batch_sizes": None if self.batch_sizes is None else list(self.batch_sizes)}


def check_trace(original: torch.nn.Module, traced: torch.nn.Module,
                example_inputs: Sequence[Any], *, notes: Sequence[str] = (),
                rtol: float | None = None, atol: float | None = None,
                seed: int = 0) -> TraceCheck:
    """Compare the traced graph with the model it was traced from.

    Args:
        original: the user's model (not modified: copies run).
        traced: the traced graph before any rewrite (not modified).
        example_inputs: the inputs given to ``fuse`` (aliased ones as given).
        notes: notes from tracing, carried into the result.
        rtol, atol: override the per-dtype tolerances.

    Returns:
        A :class:`TraceCheck`.

    Raises:
        TraceError: the traced graph differs from the model; says the trace, not a
            rewrite, is at fault, and why when known.
    """
    inputs = tuple(example_inputs)
    original, traced = _quiet_copy(original), _quiet_copy(traced)
    checks: list[Check] = []
    skipped: list[str] = []
    if original.training and random_nodes(traced, inserted=True):
        _set_eval(original)
        _set_eval(traced)
        skipped.append("trace compared in eval mode: random ops in train mode draw "
                       "differently once spelled as ATen ops")
    batch = _batch(inputs)
    with torch.no_grad():
        checks.append(_compare("example inputs", original, traced, inputs, seed, rtol, atol,
                               why=_why_example(inputs, notes)))
        fresh_check, batch_sizes = _fresh_check(original, traced, inputs, batch, seed, rtol,
                                                atol, skipped)
        if fresh_check is not None:
            checks.append(fresh_check)
    extra = () if batch_sizes is None else (
        f"the returned model accepts batch size {batch_sizes[0]} only: the trace could not "
        "keep the batch dimension dynamic",)
    return TraceCheck(tuple(checks), tuple(skipped), tuple(notes) + extra, batch_sizes)


def _fresh_check(original: torch.nn.Module, traced: torch.nn.Module, inputs: tuple[Any, ...],
                 batch: int | None, seed: int, rtol: float | None, atol: float | None,
                 skipped: list[str]) -> tuple[Check | None, tuple[int, ...] | None]:
    """Fresh distinct inputs of another batch size (of the traced one when the graph
    refuses another); returns the check and the batch sizes the graph accepts."""
    fresh = fresh_inputs(inputs, None if batch is None else batch + 1, seed + 1)
    if batch is None:
        skipped.append("trace, other batch size: no batched tensor input")
    ref = got = None
    batch_sizes = None
    try:
        ref = run(original, fresh, seed)
    except Exception as exc:  # noqa: BLE001 - the model itself is batch-specific
        skipped.append(f"trace, {'fresh inputs' if batch is None else f'batch {batch + 1}'}"
                       f": the original does not run on it ({one_line(exc)})")
    else:
        try:
            got = run(traced, fresh, seed)
        except Exception as exc:  # noqa: BLE001 - a graph fixed to the traced batch
            if batch is None:
                raise _failed("fresh inputs", exc) from exc
            log.info("traced graph refuses batch %d: %s", batch + 1, one_line(exc))
            batch_sizes = (batch,)
            skipped.append(f"trace, batch {batch + 1}: the traced graph accepts batch "
                           f"{batch} only ({one_line(exc)})")
    if got is None and batch is not None:      # fresh inputs of the traced batch size
        fresh = fresh_inputs(inputs, batch, seed + 1)
        try:
            ref = run(original, fresh, seed)
        except Exception as exc:  # noqa: BLE001 - the model wants particular values
            skipped.append(f"trace, fresh inputs: the original does not run on random "
                           f"inputs ({one_line(exc)})")
        else:
            try:
                got = run(traced, fresh, seed)
            except Exception as exc:  # noqa: BLE001
                raise _failed("fresh inputs", exc) from exc
    if got is None:
        return None, batch_sizes
    name = "fresh inputs" if batch is None else f"fresh inputs, batch {_batch(fresh)}"
    return _compare(name, original, traced, fresh, seed, rtol, atol, why=_WHY_VALUE,
                    outputs=(ref, got)), batch_sizes


_WHY_VALUE = ("the graph fixed a value or shape seen in the example inputs (a branch, a "
              "constant argument, a loop bound)")


def _why_example(inputs: tuple[Any, ...], notes: Sequence[str]) -> str:
    if any("share memory" in n for n in notes):
        return "the example inputs share memory"
    return "the tracer recorded different operations than the model runs"


def _compare(name: str, original: torch.nn.Module, traced: torch.nn.Module,
             inputs: tuple[Any, ...], seed: int, rtol: float | None, atol: float | None,
             why: str, outputs: tuple[Any, Any] | None = None) -> Check:
    """Compare the two models on ``inputs`` (or their ``outputs`` already computed)."""
    if outputs is None:
        ref = run(original, inputs, seed)
        try:
            got = run(traced, inputs, seed)
        except Exception as exc:  # noqa: BLE001
            raise _failed(name, exc) from exc
    else:
        ref, got = outputs
    try:
        return compare(f"trace: {name}", ref, got, rtol, atol)
    except VerificationError as exc:
        raise TraceError(
            f"the traced graph (before any rewrite) differs from the model on {name}: max "
            f"abs error {exc.max_abs:.3g}; the trace, not the rewrite, is at fault (likely: "
            f"{why}); nothing is returned") from exc


def _failed(name: str, exc: BaseException) -> TraceError:
    return TraceError(f"the traced graph (before any rewrite) fails on {name} where the "
                      f"model runs: {one_line(exc)}; the trace, not the rewrite, is at fault; "
                      "make the model traceable by torch.fx (tracer='symbolic')")


def _quiet_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy (its parameters shared: the checks run under no_grad) with every dropout
    module as identity (both models alike). A model that cannot be copied runs as it is,
    gradients off."""
    try:
        model = forward_copy(model)
    except Exception:  # noqa: BLE001
        return model
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    return model


def _set_eval(model: torch.nn.Module) -> None:
    try:
        model.eval()
    except Exception:  # noqa: BLE001 - a graph that keeps its traced mode
        pass


def _batch(inputs: tuple[Any, ...]) -> int | None:
    first = next((x for x in pytree.tree_leaves(inputs)
                  if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def trace_table(check: TraceCheck | None) -> str:
    """Lines for the report: the trace checks, notes and the batch sizes accepted."""
    if check is None:
        return "trace check: not run"
    lines = ["trace check: " + (", ".join(f"{c.name.removeprefix('trace: ')} "
                                          f"(max abs {c.max_abs:.3g})" for c in check.checks)
                                or "none")]
    lines += [f"trace skipped: {s}" for s in check.skipped]
    lines += [f"note: {n}" for n in check.notes]
    lines.append("batch sizes accepted: " + ("any" if check.batch_sizes is None
                                             else ", ".join(map(str, check.batch_sizes))))
    return "\n".join(lines)
