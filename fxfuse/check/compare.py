"""Compare two results tensor by tensor: finite values within a tolerance, non-finite
values exactly (same position, same sign), and, under a reduced-precision mode, against
a float64 reference within what that mode permits the original itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import VerificationError
from .precision import PrecisionMode

# rtol, and atol as a fraction of the reference's largest magnitude. Reordered sums in a
# grouped kernel move the last bits; a wrong layout moves everything.
_TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5),
               torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}

# Under a reduced-precision mode the rewrite may stray from float64 by this many times
# what the mode permits the original (its realised error, or its error re-run with the
# mode's rounding applied to every conv/matmul), plus a floor of a few unit roundoffs.
MODE_FACTOR = 4.0
FLOOR_ROUNDOFFS = 2.0


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, relative atol) used for ``dtype``."""
    return _TOLERANCES.get(dtype, (1e-4, 1e-5))


@dataclass(frozen=True)
class Check:
    """One comparison: what was compared and how far apart it was (``max_rel`` is the
    largest absolute error over the reference's largest magnitude, at least 1)."""

    name: str
    max_abs: float
    max_rel: float


def leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _pairs(name: str, ref: Any, got: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    refs, gots = leaves(ref), leaves(got)
    if len(refs) != len(gots):
        raise VerificationError(f"{name}: the rewritten model returns {len(gots)} tensors, "
                                f"the original {len(refs)}", check=name)
    for r, g in zip(refs, gots):
        if r.shape != g.shape or r.dtype != g.dtype:
            raise VerificationError(f"{name}: output {tuple(g.shape)} {g.dtype} differs from "
                                    f"the original's {tuple(r.shape)} {r.dtype}", check=name)
    return list(zip(refs, gots))


def check_nonfinite(name: str, index: int, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Raise unless NaN and +-inf sit at the same places in both; return the finite mask.

    Raises:
        VerificationError: a non-finite value differs, or the original's output is all NaN
            (nothing could be compared).
    """
    r, g = r.detach(), g.detach()
    if r.device != g.device:
        raise VerificationError(
            f"the rewrite changes the numbers ({name}): output {index} is on {r.device} in "
            f"the original and on {g.device} in the rewrite (the model fills a buffer made "
            "on another device than its input: allocate it with device=x.device); the "
            "rewrite is refused", max_abs=float("inf"), max_rel=float("inf"), check=name)
    if not (r.is_floating_point() or r.is_complex()):
        return torch.ones_like(r, dtype=torch.bool)
    for label, test in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                        ("-inf", torch.isneginf)):
        if r.is_complex() and label != "NaN":
            continue
        rm, gm = test(r), test(g)
        if not torch.equal(rm, gm):
            at = tuple((rm != gm).nonzero()[0].tolist())
            raise VerificationError(
                f"the rewrite changes the numbers ({name}): output {index} at {at} is "
                f"{r[at].item()} in the original and {g[at].item()} in the rewrite "
                f"({label} must match exactly); the rewrite is refused",
                max_abs=float("inf"), max_rel=float("inf"), check=name)
    if r.numel() and bool(torch.isnan(r).all()):
        raise VerificationError(
            f"{name}: output {index} of the original model is all NaN, so nothing can be "
            "compared; check the model's weights and the inputs", check=name)
    return torch.isfinite(r)


def compare(name: str, ref: Any, got: Any, rtol: float | None = None,
            atol: float | None = None) -> Check:
    """Compare two (nested) results tensor by tensor.

    Raises:
        VerificationError: shapes differ, a non-finite value differs, the original's
            output is all NaN, or a value is out of tolerance.
    """
    worst_abs = worst_rel = 0.0
    for i, (r, g) in enumerate(_pairs(name, ref, got)):
        finite = check_nonfinite(name, i, r, g)
        if r.numel() == 0:
            continue
        r64, g64 = r.detach().double()[finite], g.detach().double()[finite]
        if r64.numel() == 0:
            continue
        diff = (r64 - g64).abs()
        scale = max(1.0, float(r64.abs().max()))
        d_rtol, d_atol = tolerances(r.dtype)
        rt = d_rtol if rtol is None else rtol
        at = d_atol * scale if atol is None else atol
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / scale)
        if bool((diff > at + rt * r64.abs()).any()):
            raise VerificationError(
                f"the rewrite changes the numbers ({name}): max abs error {worst_abs:.3g}, max "
                f"rel error {worst_rel:.3g} (rtol {rt:g}, atol {at:.3g}); the rewrite is refused",
                max_abs=worst_abs, max_rel=worst_rel, check=name)
    return Check(name, worst_abs, worst_rel)


def _max_err(a: torch.Tensor, ref: torch.Tensor, finite: torch.Tensor) -> float:
    if not bool(finite.any()):
        return 0.0
    return float((a.detach().double()[finite] - ref.detach().double()[finite]).abs().max())


def judge_in_mode(name: str, original: Any, got: Any, reference: Any, emulated: Any | None,
                  mode: PrecisionMode) -> tuple[Check, str]:
    """Accept ``got`` when its error against ``reference`` (float64, or full precision)
    is within what ``mode`` permits the original model.

    Args:
        original: the original model's output in the mode.
        got: the rewritten model's output in the mode.
        reference: the original's output in float64 (or with every shortcut off).
        emulated: the original's output with the mode's rounding forced on every
            conv/matmul (None when the mode cannot be emulated).

    Returns:
        The check, and a line for the report saying what was compared and whether the
        rewrite ran in the reduced precision where the original did not.

    Raises:
        VerificationError: the rewrite strays further than the mode permits.
    """
    worst_abs = worst_rel = 0.0
    moved, label, e_new_all, e_orig_all, allowed_all = False, "", 0.0, 0.0, 0.0
    refs = leaves(reference)
    emus = leaves(emulated) if emulated is not None else [None] * len(refs)
    for i, ((r, g), ref, emu) in enumerate(zip(_pairs(name, original, got), refs, emus)):
        if r.numel() == 0:
            continue
        reduced = mode.reduced_for(r.dtype)
        if reduced is None:
            compare(f"{name} (output {i})", r, g)
            continue
        label = reduced
        finite = check_nonfinite(name, i, r, g) & torch.isfinite(ref)
        scale = max(1.0, float(ref.detach().double()[finite].abs().max())) \
            if bool(finite.any()) else 1.0
        e_new, e_orig = _max_err(g, ref, finite), _max_err(r, ref, finite)
        e_emu = _max_err(emu, ref, finite) if emu is not None else 0.0
        allowed = MODE_FACTOR * max(e_orig, e_emu) + \
            FLOOR_ROUNDOFFS * mode.unit_roundoff(r.dtype) * scale
        diff = _max_err(g, r, finite)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
        e_new_all, e_orig_all = max(e_new_all, e_new), max(e_orig_all, e_orig)
        allowed_all = max(allowed_all, allowed)
        if e_new > allowed:
            raise VerificationError(
                f"the rewrite changes the numbers ({name}): against float64 its error is "
                f"{e_new:.3g}, more than the {allowed:.3g} that {reduced} permits the "
                f"original (whose own error is {e_orig:.3g}); the rewrite is refused",
                max_abs=worst_abs, max_rel=worst_rel, check=name)
        moved = moved or e_new > MODE_FACTOR * e_orig
    if moved:
        note = (f"{name}: the rewrite ran in {label} where the original ran at full "
                f"precision (error against float64: rewrite {e_new_all:.2g}, original "
                f"{e_orig_all:.2g}; {label} permits {allowed_all:.2g})")
    else:
        note = (f"{name}: judged against float64 under {label} (error: rewrite "
                f"{e_new_all:.2g}, original {e_orig_all:.2g}, permitted {allowed_all:.2g})")
    return Check(name, worst_abs, worst_rel), note
