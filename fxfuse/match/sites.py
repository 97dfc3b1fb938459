"""Frozen descriptions of what the matcher found. They name graph nodes, never hold them.

A *site* is one loop: H per-row ``Conv1d`` calls that read rows of one source tensor
and whose results are combined into one tensor (``cat``, ``stack`` or writes into a
preallocated buffer). The matcher fills these in and never touches the graph; the
rewriter reads them and changes the graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

SliceKind = Literal["select", "block"]
Family = Literal["conv", "linear"]
Reduce = Literal["", "sum", "mean"]
Lowering = Literal["", "loop", "grouped", "grouped2d", "im2col", "batched", "bmm", "dense"]


@dataclass(frozen=True)
class ConvSpec:
    """Everything that must agree between rows for them to share one grouped conv."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int | str
    dilation: int
    groups: int
    bias: bool
    padding_mode: str
    dtype: torch.dtype
    device: str

    def differences(self, other: "ConvSpec") -> list[str]:
        """Names of the fields in which ``other`` differs from this spec."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def describe(self) -> str:
        """Short text such as ``15→15 k3 s1 p1 d1 g1 +bias``."""
        parts = [f"{self.in_channels}→{self.out_channels}", f"k{self.kernel_size}"]
        if self.stride != 1:
            parts.append(f"s{self.stride}")
        if self.padding != 0:
            parts.append(f"p{self.padding}" if isinstance(self.padding, int) else f"p'{self.padding}'")
        if self.dilation != 1:
            parts.append(f"d{self.dilation}")
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.padding_mode != "zeros":
            parts.append(self.padding_mode)
        parts.append("+bias" if self.bias else "no bias")
        return " ".join(parts)


@dataclass(frozen=True)
class InputPlan:
    """How the per-row inputs are read from the source tensor.

    ``kind == "select"``: row ``r`` is ``source.permute(axes)[:, r]`` where
    ``axes = (batch_axis, row_axis, channel_axis, length_axis)`` (a 4-D source).
    ``kind == "block"``: row ``r`` is ``source.permute(axes)[:, r : r + width]`` where
    ``axes = (batch_axis, row_axis, length_axis)`` (a 3-D source whose channels the
    rows split into blocks; the hand-written grouped conv). With ``row_shape``, each
    selected row's non-batch dims are then reshaped (row-major) to ``row_shape``.
    """

    kind: SliceKind
    axes: tuple[int, ...]
    rows: tuple[int, ...]          # row index (select) or first channel (block), in combine order
    width: int                      # channels per row
    source_rows: int                # size of the source's row axis (select) or channel axis (block)
    feature_last: bool = False      # Linear rows: the row's last axis is the sliced one
                                    # (dim 1 above); the rewrite moves it back to the end
    row_shape: tuple[int, ...] = () # select only: each row's non-batch dims after a reshape
    #                                 (``x[:, i].flatten(-2)``), () when rows are plain slices

    @property
    def row_ndim(self) -> int:
        """Dims of one row, the batch dim included."""
        if self.row_shape:
            return 1 + len(self.row_shape)
        return len(self.axes) - (1 if self.kind == "select" else 0)

    @property
    def is_identity_order(self) -> bool:
        """True when the rows cover the source's row axis exactly, in order (no gather)."""
        if self.kind == "select":
            return self.rows == tuple(range(self.source_rows))
        return self.rows == tuple(range(0, self.source_rows, self.width)) and \
            len(self.rows) * self.width == self.source_rows


@dataclass(frozen=True)
class OutputPlan:
    """How the combined result is laid out relative to ``F`` = the per-row outputs stacked
    on dim 1, shape (N, H, C_out, L_out): ``result = F.permute(perm)``, then each run of
    permuted dims in ``merge`` is flattened into one (``merge`` lists the number of
    permuted dims that form each result dim)."""

    perm: tuple[int, ...]
    merge: tuple[int, ...]

    def spans(self) -> list[tuple[int, int]]:
        """Per result dim, the ``[start, stop)`` positions in ``perm`` it flattens."""
        spans, start = [], 0
        for count in self.merge:
            spans.append((start, start + count))
            start += count
        return spans


@dataclass(frozen=True)
class RowMatch:
    """What the matcher found: one loop of per-row ops, fusable or not (immutable).

    Attributes:
        name: a stable label (``site0``, ``site1``, ...), in graph order.
        combine: name of the node that joins the rows (``cat``/``stack`` node or buffer).
        combine_kind: ``"cat"``, ``"stack"``, ``"buffer"`` or ``"sum"`` (``"stack+sum"``
            when a stack is then reduced over the rows).
        source: name of the tensor the rows are read from (``""`` when unknown).
        convs: per row, the op that names the row (its first conv or Linear), in combine order.
        targets: per row, the module path or weight attribute of that op.
        spec: the shared conv settings (``None`` for Linear heads or when none found).
        input_plan / output_plan: the layout facts the rewrite needs.
        row_exports: row outputs also used outside the loop; the rewrite feeds those
            users a copy of their slice of the fused output.
        input_nodes: the indexing nodes between the source and the rows (erased when
            nothing else uses them).
        output_nodes: the nodes between the rows and the combined result (unsqueezes,
            buffer views and writes), erased by the rewrite.
        chains: per row, the per-row op nodes from input to output (one conv, or a
            tower such as conv → batchnorm → relu → conv, or Linear heads).
        steps: the per-row steps, as text (``conv 15→15 k3``, ``batchnorm 15``, ``relu``).
        groups: row positions fused together; several groups when rows differ
            (e.g. two kernel sizes), each fused on its own.
        family: ``"conv"`` (grouped convolution layout) or ``"linear"`` (batched matmul).
        loop_kind: what kind of loop this is, for reports.
        reduce: ``"sum"`` or ``"mean"`` when the rows are summed (averaged) over: the
            site is then one dense op, ``output_plan`` the layout of the reduced result.
        shared_module: all rows call the same module (rewritten by folding rows into batch).
        reason: why the site is not fusable (``""`` when it is).
        twin: the weights the loop reads, row by row and step by step
            (:func:`fxfuse.match.params.twin_key`): sites with equal ``twin`` run the very
            same layers (a loop module applied twice).
    """

    name: str
    combine: str
    combine_kind: str
    source: str = ""
    convs: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    spec: ConvSpec | None = None
    input_plan: InputPlan | None = None
    output_plan: OutputPlan | None = None
    row_exports: tuple[str, ...] = ()
    input_nodes: tuple[str, ...] = ()
    output_nodes: tuple[str, ...] = ()
    chains: tuple[tuple[str, ...], ...] = ()
    steps: tuple[str, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    family: Family = "conv"
    loop_kind: str = ""
    reduce: Reduce = ""
    shared_module: bool = False
    reason: str = ""
    twin: tuple = ()


@dataclass(frozen=True)
class RowSite:
    """One loop: what the matcher found (:class:`RowMatch`, every field readable on the
    site itself: ``site.reason``, ``site.convs``...) and what the pass did with it.

    Attributes:
        match: the loop as found.
        lowering: what the pass did: ``"grouped"``, ``"grouped2d"``, ``"batched"``,
            ``"bmm"``, ``"dense"``, ``"loop"`` (kept), or ``""`` (not fusable / not applied).
        notes: facts worth telling the user (e.g. rows fused in groups).
        timings: per candidate lowering, estimated seconds, when the choice was measured.
        decision: ``auto``'s decision, JSON-ready (each candidate's estimate and spread,
            the margin, the threshold, the rule); ``None`` when auto did not decide.
    """

    match: RowMatch
    lowering: Lowering = ""
    notes: tuple[str, ...] = ()
    timings: tuple[tuple[str, float], ...] = ()
    decision: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def rows(self) -> int:
        """Number of per-row convs in the loop."""
        return len(self.convs)

    @property
    def fusable(self) -> bool:
        """True when the matcher found nothing that forbids the rewrite."""
        return not self.reason

    @property
    def fused(self) -> bool:
        """True when the pass rewrote this site."""
        return self.lowering not in ("", "loop")

    def where(self) -> str:
        """Where the loop lives, e.g. ``layers.0..layers.9``."""
        if not self.targets:
            return self.combine
        if len(self.targets) == 1 or len(set(self.targets)) == 1:
            return self.targets[0]
        return f"{self.targets[0]}..{self.targets[-1]}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "name": self.name,
            "where": self.where(),
            "combine": self.combine,
            "combine_kind": self.combine_kind,
            "source": self.source,
            "rows": self.rows,
            "row_indices": list(self.input_plan.rows) if self.input_plan else [],
            "targets": list(self.targets),
            "conv": None if self.spec is None else {
                k: (str(v) if isinstance(v, torch.dtype) else v)
                for k, v in dataclasses.asdict(self.spec).items()},
            "fusable": self.fusable,
            "fused": self.fused,
            "loop_kind": self.loop_kind,
            "steps": list(self.steps),
            "groups": [list(g) for g in self.groups],
            "lowering": self.lowering,
            "reason": self.reason,
            "notes": list(self.notes),
            "timings_s": dict(self.timings),
            "decision": self.decision,
        }


for _field in dataclasses.fields(RowMatch):    # site.reason, site.convs, ... read the match
    setattr(RowSite, _field.name, property(
        lambda self, _n=_field.name: getattr(self.match, _n),
        doc=f"``match.{_field.name}``"))
del _field


def twin_of(site: RowSite) -> tuple:
    """The key under which sites that run the very same layers (one loop module applied
    twice) must get the same lowering and share one fused module."""
    return ("twin", site.twin) if site.twin else ("site", site.name)
