"""Check that a rewritten model computes what the original did. Knows nothing of matching.

The checks: outputs on the example inputs (and that the rewrite's outputs share no memory
the original's did not); outputs on fresh random inputs at batch 1 and at two larger batches
than traced, one even and one odd; outputs in the other train/eval mode; in train mode, outputs and gradients
(inputs and parameters, the fused parameters' gradients mapped back through the
:class:`WeightMap`). Under a reduced-precision mode (TF32 on CUDA) a result outside the
float tolerance is judged against float64 by what the mode permits the original
(:mod:`fxfuse.check.precision`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import VerificationError
from ..trace.traced import tracer_of
from ..weightmap import WeightMap
from . import precision as _precision
from .compare import (FLOOR_ROUNDOFFS, MODE_FACTOR, Check, compare, judge_in_mode,
                      leaves as _leaves, tolerances)
from .precision import PrecisionMode
from .runs import fresh_inputs, random_nodes, run as _run
from .trainstep import draws_hidden_random, forward_copy, grad_checks, quiet_dropout

__all__ = ["Check", "VerifyReport", "compare", "permitted_error", "tolerances",
           "verify_models"]

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class VerifyReport:
    """Every check that ran and every check that was skipped (with why).

    Attributes:
        precision: the precision mode in force (e.g. ``"cuda: TF32 convolutions allowed"``).
        notes: how results were judged under that mode, and each check where the rewrite
            ran in reduced precision (TF32) where the original did not.
        batch_sizes: the batch sizes the rewritten model was checked at and agreed.
        batch_refused: batch sizes the original runs but the traced program does not
            accept (its guards narrow the range); never claim those.
        modes: the train/eval modes the rewritten model was checked in.
    """

    checks: tuple[Check, ...]
    skipped: tuple[str, ...] = ()
    precision: str = ""
    notes: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    batch_refused: tuple[int, ...] = ()
    modes: tuple[str, ...] = ()

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.checks), default=0.0)


def _device(model: torch.nn.Module, inputs: Sequence[Any]) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()) + _leaves(list(inputs)):
        return t.device
    return torch.device("cpu")


class _Judge:
    """Compares one check's results; under a reduced-precision mode, a result outside the
    float tolerance is re-judged against the original in float64."""

    def __init__(self, original: torch.nn.Module, mode: PrecisionMode, rtol: float | None,
                 atol: float | None, seed: int) -> None:
        self.original, self.mode, self.rtol, self.atol, self.seed = \
            original, mode, rtol, atol, seed
        self.notes: list[str] = []

    def __call__(self, name: str, inputs: Sequence[Any], ref: Any, got: Any) -> Check:
        try:
            return compare(name, ref, got, self.rtol, self.atol)
        except VerificationError:
            if self.rtol is not None or self.atol is not None or \
                    not any(self.mode.reduced_for(t.dtype) for t in _leaves(ref)):
                raise
        check, note = judge_in_mode(name, ref, got, self.reference(inputs),
                                    self.emulated(inputs), self.mode)
        self.notes.append(note)
        return check

    def emulated(self, inputs: Sequence[Any]) -> Any:
        """The original with the mode's TF32 rounding forced (None: nothing to emulate)."""
        if not (self.mode.conv_tf32 or self.mode.matmul_tf32):
            return None
        with _precision.emulate_tf32(self.mode), torch.no_grad():
            return _run(self.original, inputs, self.seed)

    def reference(self, inputs: Sequence[Any]) -> Any:
        """The original in float64 (cast back), or with every shortcut off."""
        def to64(v: Any) -> Any:
            return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        with torch.no_grad():
            try:
                model64 = copy.deepcopy(self.original).double()
                return _run(model64, pytree.tree_map(to64, list(inputs)), self.seed)
            except Exception:  # noqa: BLE001 - a model pinned to its dtype
                with _precision.full_precision():
                    return _run(self.original, inputs, self.seed)


def _check_weights(model: torch.nn.Module) -> None:
    """A NaN weight makes every comparison meaningless: say so instead of "error 0"."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and t.numel() and (
                    bool(t.isnan().any()) if kind == "parameter" else bool(t.isnan().all())):
                raise VerificationError(
                    f"the model's {kind} {name} holds NaN, so its outputs cannot be compared; "
                    "load finite weights before fusing", check=f"{kind} {name}")


def _check_aliasing(original_out: Any, fused_out: Any) -> None:
    """Refuse outputs that share memory in the rewrite where the original's do not."""
    def overlaps(outs: list[torch.Tensor]) -> set[tuple[int, int]]:
        found = set()
        for i, a in enumerate(outs):
            for j in range(i + 1, len(outs)):
                b = outs[j]
                if a.numel() and b.numel() and a.device == b.device and \
                        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                    found.add((i, j))
        return found
    new = overlaps(_leaves(fused_out)) - overlaps(_leaves(original_out))
    if new:
        i, j = sorted(new)[0]
        raise VerificationError(
            f"outputs {i} and {j} of the rewritten model share memory where the original's do "
            "not (an in-place change to one would change the other); the rewrite is refused",
            check="output aliasing")


def _other_batches(batch: int) -> list[int]:
    """Batch 1 and two batches larger than traced, one even and one odd (neither a
    multiple of it): a forward that branches on the batch size's parity shows."""
    return sorted({1, 2 * batch + 2, 2 * batch + 3} - {batch})


def verify_models(original: torch.nn.Module, fused: torch.nn.Module, example_inputs: Sequence[Any],
                  *, weight_map: WeightMap | None = None, check_grads: bool = True,
                  rtol: float | None = None, atol: float | None = None,
                  seed: int = 0, precision: PrecisionMode | None = None,
                  exported: bool | None = None) -> VerifyReport:
    """Compare ``fused`` against ``original``; raise on the first mismatch.

    Args:
        original: the reference model (not modified; train-mode checks use copies).
        fused: the rewritten model (not modified either).
        example_inputs: the inputs the model was traced with (never modified).
        weight_map: maps the fused model's parameter names back to the original's, so
            parameter gradients can be compared.
        check_grads: also compare gradients in train mode.
        rtol, atol: override the per-dtype tolerances (and the precision-mode judgement).
        precision: the precision mode to judge by; default what the current torch
            settings allow on the models' device (:func:`detect_precision`).
        exported: ``fused`` is a torch.export program whose guards fix its batch range
            (default: what its ``meta`` records).

    Returns:
        A :class:`VerifyReport`: worst errors, the precision mode, the batch sizes and
        train/eval modes checked.

    Raises:
        VerificationError: a check failed; carries ``max_abs``, ``max_rel``, ``check``.
    """
    inputs = tuple(example_inputs)
    mode = precision or _precision.detect_precision(_device(original, inputs))
    _check_weights(original)
    checks, skipped = [], []
    # Copies: a train-mode forward updates BatchNorm statistics, and the caller's
    # models must come out of verification as they went in.
    hidden = draws_hidden_random(original, inputs, seed)
    to_eval = fused.training and (bool(random_nodes(fused)) or hidden)
    exported = _is_exported(fused) if exported is None else exported
    given = (original, fused)
    original, fused = _copy_for_checks(original, to_eval), _copy_for_checks(fused, to_eval)
    if to_eval:
        skipped.append("outputs compared in eval mode: the model " + (
            "draws random numbers in train mode that cannot be switched off (its train "
            "step is compared from one RNG seed)" if hidden else
            "calls a random op in train mode"))
    judge = _Judge(original, mode, rtol, atol, seed)
    batches, refused = [], []
    with torch.no_grad():
        ref, got = _run(original, inputs, seed), _run(fused, inputs, seed)
        checks.append(judge("example inputs", inputs, ref, got))
        _check_aliasing(ref, got)
        first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
        if first is None:
            skipped.append("other batch sizes: no batched tensor input")
        else:
            batches.append(first.shape[0])
            for batch in _other_batches(first.shape[0]):
                _batch_check(original, fused, exported, inputs, batch, seed, judge, checks,
                             skipped, batches, refused)
        modes = _mode_checks(original, fused, inputs, seed, judge, check_grads, checks, skipped)
    if check_grads:
        # The train step starts from the state both models came in with (the forward
        # checks above moved train-mode BatchNorm statistics, each model by its own
        # rounding); it copies the models again, parameters included, for its backward.
        step_models = tuple(_copy_for_checks(m, to_eval) for m in given)
        checks.extend(grad_checks(*step_models, inputs, weight_map or WeightMap(),
                                   seed, rtol, atol, skipped, mode))
    report = VerifyReport(tuple(checks), tuple(skipped), mode.describe(), tuple(judge.notes),
                          tuple(sorted(batches)), tuple(refused), modes)
    log.info("verified: max abs %.3g, max rel %.3g (%s)", report.max_abs, report.max_rel,
             report.precision)
    return report


def _batch_check(original: Callable, fused: Callable, exported: bool,
                 inputs: tuple[Any, ...], batch: int,
                 seed: int, judge: _Judge, checks: list[Check], skipped: list[str],
                 batches: list[int], refused: list[int]) -> None:
    other = fresh_inputs(inputs, batch, seed + batch)
    try:
        ref = _run(original, other, seed)
    except Exception as exc:  # noqa: BLE001 - the model itself is batch-specific
        skipped.append(f"batch {batch}: the original model does not run on it ({exc})")
        return
    try:
        got = _run(fused, other, seed)
    except Exception as exc:  # noqa: BLE001
        if not exported:
            raise VerificationError(f"the rewritten model fails on batch {batch} where the "
                                    f"original runs: {exc}", check=f"batch {batch}") from exc
        refused.append(batch)
        skipped.append(f"batch {batch}: the traced program does not accept it (its guards "
                       f"narrow the batch range): {str(exc).splitlines()[0] if str(exc) else exc}")
        return
    try:
        checks.append(judge(f"batch {batch}", other, ref, got))
    except VerificationError as exc:
        if not exported:
            raise
        raise VerificationError(
            f"at batch {batch} the exported program differs from the model (max abs error "
            f"{exc.max_abs:.3g}): the model's forward depends on the batch size, which "
            "torch.export fixed when tracing, so the program is wrong at other batch sizes; "
            "the rewrite is refused",
            max_abs=exc.max_abs, max_rel=exc.max_rel, check=exc.check) from exc
    batches.append(batch)


def _is_exported(model: torch.nn.Module) -> bool:
    """A torch.export program: shapes and the train/eval mode are fixed by its guards."""
    return tracer_of(model) == "export"


def _mode_checks(original: torch.nn.Module, fused: torch.nn.Module, inputs: tuple[Any, ...],
                 seed: int, judge: _Judge, check_grads: bool, checks: list[Check],
                 skipped: list[str]) -> tuple[str, ...]:
    """Outputs in the mode the model was not given in. A symbolic trace bakes
    ``self.training`` branches in, so the rewrite can be right in one mode only."""
    given = "train" if original.training else "eval"
    other = "eval" if original.training else "train"
    ref_model, new_model = forward_copy(original), forward_copy(fused)
    try:
        ref_model.train(other == "train")
        new_model.train(other == "train")
    except NotImplementedError:
        skipped.append(f"{other} mode: the exported program keeps the {given} mode it was "
                       f"traced in; run it in {given} mode only")
        return (given,)
    if other == "train" and check_grads:
        return (given, other)                       # the train step below compares it
    for model in (ref_model, new_model):
        quiet_dropout(model)
    if other == "train" and (random_nodes(new_model) or
                             draws_hidden_random(ref_model, inputs, seed)):
        skipped.append("train mode: the model draws random numbers in train mode")
        return (given,)
    ref = _run(ref_model, inputs, seed)
    try:
        got = _run(new_model, inputs, seed)
        checks.append(judge(f"{other} mode", inputs, ref, got))
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(
            f"in {other} mode the rewritten model differs from the original (the trace fixed "
            f"the {given}-mode branches): {exc}; fuse the model in the mode it will run in, "
            f"or trace with concrete_args", check=f"{other} mode") from exc
    return (given, other)


def _copy_for_checks(model: torch.nn.Module, to_eval: bool) -> torch.nn.Module:
    model = forward_copy(model)
    quiet_dropout(model)
    if to_eval:
        try:
            model.eval()
        except Exception:  # noqa: BLE001 - exported graphs keep their mode
            pass
    return model


def permitted_error(model: torch.nn.Module, inputs: Sequence[Any], *,
                    precision: PrecisionMode | None = None, seed: int = 0) -> float:
    """The largest absolute difference from ``model``'s own output that a rewrite may
    show on ``inputs``: the float tolerance of the output's dtype, or, under TF32 or
    reduced-precision reductions, what the mode permits ``model`` against float64 (plus
    the model's own error). For self-checks that compare outputs directly.
    """
    inputs = tuple(inputs)
    mode = precision or _precision.detect_precision(_device(model, inputs))
    with torch.no_grad():
        outs = _leaves(_run(model, inputs, seed))
    tol = 0.0
    for out in outs:
        rtol, atol = tolerances(out.dtype)
        big = float(out.detach().double().abs().nan_to_num(0, 0, 0).max()) if out.numel() else 0.0
        tol = max(tol, atol * max(1.0, big) + rtol * big)
    if not any(mode.reduced_for(o.dtype) for o in outs):
        return tol
    judge = _Judge(model, mode, None, None, seed)
    refs, emus = _leaves(judge.reference(inputs)), judge.emulated(inputs)
    emus = _leaves(emus) if emus is not None else [None] * len(refs)
    for out, ref, emu in zip(outs, refs, emus):
        if not out.numel() or mode.reduced_for(out.dtype) is None:
            continue
        ref = ref.detach().double().nan_to_num(0, 0, 0)
        e_orig = float((out.detach().double().nan_to_num(0, 0, 0) - ref).abs().max())
        e_emu = 0.0 if emu is None else \
            float((emu.detach().double().nan_to_num(0, 0, 0) - ref).abs().max())
        floor = FLOOR_ROUNDOFFS * mode.unit_roundoff(out.dtype) * max(1.0, float(ref.abs().max()))
        tol = max(tol, MODE_FACTOR * max(e_orig, e_emu) + floor + e_orig)
    return tol
