"""Rows that differ only in conv kernel size (multi-scale convs, mixed-kernel blocks).

Each row's kernel is zero-padded to the largest one, at the offset that lines its taps
up with the largest row's padding, so one grouped conv computes every row exactly. That
holds when, for every row, the largest row's left padding exceeds the row's by a whole
number of dilation steps ``o`` and the right paddings differ by the rest of the padded
width: then every output position reads the same inputs with the same weights, and the
output lengths agree. Otherwise the rows are refused with the offsets that do not fit.
Rows are padded only when some kernel size has a single row: when every size has two
or more rows, one grouped conv per size computes no zero taps (the matcher's groups).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .sites import ConvSpec


@dataclass(frozen=True)
class KernelPlan:
    """Where each row's kernel sits in the padded one: (offset, size) per row."""

    width: int
    windows: tuple[tuple[int, int], ...]
    target: int                      # the row whose settings (padding) the fused conv takes

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(i for i, (_, k) in enumerate(self.windows) if k != self.width)


def input_sides(spec: ConvSpec) -> tuple[int, int]:
    """The zeros added on the left and right of the input, as torch pads them."""
    if spec.padding == "valid":
        return 0, 0
    if spec.padding == "same":
        total = spec.dilation * (spec.kernel_size - 1)
        return total // 2, total - total // 2
    return int(spec.padding), int(spec.padding)


def loose_key(key: object) -> object:
    """A conv key without kernel size and padding (other keys unchanged)."""
    if isinstance(key, ConvSpec):
        return dataclasses.replace(key, kernel_size=0, padding=0)
    return key


def kernel_plan(specs: list[ConvSpec]) -> KernelPlan | str:
    """How to pad these rows' kernels to the largest (same other settings), or why not."""
    target = max(range(len(specs)), key=lambda i: specs[i].kernel_size)
    big = specs[target]
    if big.padding_mode != "zeros":
        return (f"the kernel sizes differ and the convs pad with {big.padding_mode!r}; only "
                "zero padding (padding_mode='zeros') lets a kernel padded to the largest "
                "compute a smaller one")
    left, right = input_sides(big)
    windows = []
    for i, s in enumerate(specs):
        l_i, r_i = input_sides(s)
        offset, rem = divmod(left - l_i, s.dilation)
        if rem or offset < 0 or right - r_i != s.dilation * (big.kernel_size - s.kernel_size - offset):
            return (f"the kernel sizes differ and row {i} (k{s.kernel_size}, padding "
                    f"{s.padding!r}) does not line up with row {target} (k{big.kernel_size}, "
                    f"padding {big.padding!r}); pad the rows so that their outputs align "
                    "(e.g. padding='same')")
        windows.append((offset, s.kernel_size))
    return KernelPlan(big.kernel_size, tuple(windows), target)


def mixed_kernels(chains: list) -> list[KernelPlan | None] | str | None:
    """For rows whose chains differ only in conv kernel size and padding: one
    :class:`KernelPlan` per step (None for other steps), or why they cannot be padded;
    None when the rows differ otherwise (or not at all)."""
    keys = {c.key for c in chains}
    if len(keys) == 1 or len({tuple(loose_key(k) for k in c.key) for c in chains}) != 1:
        return None
    plans: list[KernelPlan | None] = []
    for j, op in enumerate(chains[0].ops):
        if not isinstance(op.key, ConvSpec) or len({c.ops[j].key for c in chains}) == 1:
            plans.append(None)
            continue
        plan = kernel_plan([c.ops[j].key for c in chains])
        if isinstance(plan, str):
            return plan
        plans.append(plan)
    return plans


PADDED = "zero-padded to"


def has_padded_kernels(notes: tuple[str, ...]) -> bool:
    """A site's notes say some rows' kernels were zero-padded (:func:`padded_note`)."""
    return any(PADDED in n for n in notes)


def padded_note(chains: list) -> tuple[str, ...]:
    """The report line saying which rows' kernels were zero-padded, or nothing."""
    plans = mixed_kernels(chains)
    if not isinstance(plans, list):
        return ()
    notes = []
    for j, plan in enumerate(plans):
        if plan is not None:
            rows = ", ".join(f"{i} (k{plan.windows[i][1]})" for i in plan.padded)
            notes.append(f"step {j + 1}: kernels of rows {rows} {PADDED} k{plan.width}")
    return tuple(notes)
