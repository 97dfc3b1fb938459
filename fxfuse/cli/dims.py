"""The dims other than the batch that an input ``.pt2`` accepts at many sizes: each one
the written ``.pt2`` keeps is checked against the original at another size, and each one
it fixes is named in a warning."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.programs import DynamicDim, ProgramShapes
from ..io.saving import SavedModel
from .console import warn
from .outputs import _program_matches


def _resized(inputs: tuple, d: DynamicDim, size: int) -> tuple:
    """``inputs`` with input ``d.index`` drawn afresh (seeded) at ``size`` in ``d.dim``."""
    gen = torch.Generator().manual_seed(size)
    x = inputs[d.index]
    shape = list(x.shape)
    shape[d.dim] = size
    fresh = torch.randn(shape, generator=gen).to(x.dtype).to(x.device) \
        if x.is_floating_point() else x.narrow(d.dim, 0, 1).expand(shape).clone()
    return inputs[:d.index] + (fresh,) + inputs[d.index + 1:]


def _other_size(d: DynamicDim, size: int) -> int:
    high = None if d.high is None or str(d.high) in ("oo", "int_oo") else int(d.high)
    return size + 1 if high is None or size + 1 <= high else size - 1


def confirm_kept_dims(original: torch.nn.Module, saved: SavedModel,
                      inputs: tuple) -> dict[str, list[int]]:
    """Per kept dim (described), the sizes the written program matched the original at:
    the example's, and one more compared here."""
    checked = {}
    for d in saved.kept_dims:
        size = int(inputs[d.index].shape[d.dim])
        other = _other_size(d, size)
        sizes = [size]
        if _program_matches(original, saved, _resized(inputs, d, other)):
            sizes.append(other)
        else:
            warn(f"the written program was not confirmed at size {other} in {d.describe()} "
                 f"(it fails there or differs from the original); use it at size {size} there")
        checked[d.describe()] = sorted(sizes)
    return checked


def dims_text(checked: dict[str, list[int]]) -> str:
    """The closing line's words for the kept dims."""
    return "".join(f"; dynamic in {what} (checked at {', '.join(map(str, sizes))})"
                   for what, sizes in checked.items())


def warn_fixed_dims(source: str, shapes: ProgramShapes | None, out: Path,
                    saved: SavedModel | None, inputs: tuple) -> None:
    """One warning naming each dynamic dim of the input program (not the batch) that the
    output fixes (a ``.safetensors`` or ``.pt`` output fixes none)."""
    if shapes is None or out.suffix.lower() in (".safetensors", ".pt", ".pth"):
        return
    kept = set(saved.kept_dims) if saved is not None else set()
    fixed = [d for d in shapes.dynamic if d.dim != 0 and d not in kept]
    if fixed:
        sizes = ", ".join(f"{d.describe()} fixed at {inputs[d.index].shape[d.dim]}"
                          for d in fixed)
        warn(f"{source} accepts more than one size in {sizes}; the fused program accepts "
             "only that size there (the rewritten graph does not allow more)")
