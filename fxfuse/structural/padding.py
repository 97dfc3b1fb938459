"""Is padding the rows' tensors to the largest exact? Checked on values, op by op.

Row ``r`` is run alone three ways on its own example inputs (the values the model's
rows read on the example inputs): with its own tensors, with its tensors zero-padded
(what the fused loop runs), and with the padding filled with large non-zero garbage.
Every op's result, cut back to its shape in the first run, must agree in all three: then
the padded positions only ever flow to positions that are sliced off, and nothing reads
the padded size. The first op where they do not agree is named in the refusal (a softmax
or a norm over the padded axis, a ``size`` that reads it). The cut of each result (which
dims to narrow to which size) is what the slice-back after the fused loop does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .body import RowFunction, StackedTensor
from .plan import Refused, RowPlan

Cut = tuple[tuple[int, int], ...]      # (dim, size) pairs: narrow(dim, 0, size) each
_PREFIX = "padding row sizes is not exact here"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: dict[fx.Node, Any] = {}
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method", "output"):
            self.seen[n] = out
        return out


class _Runner(nn.Module):
    """Runs the row function and returns every op's value (for ``functional_call``);
    ``current`` is the last op it ran (the one that raised, if one did)."""

    def __init__(self, inner: fx.GraphModule) -> None:
        super().__init__()
        self.inner = inner
        self.current: fx.Node | None = None

    def forward(self, *args: Any) -> dict[fx.Node, Any]:
        recorder = _Recorder(self.inner)
        try:
            recorder.run(*args)
        finally:
            self.current = recorder.current
        return recorder.seen


def _garbage(s: StackedTensor, row: int) -> torch.Tensor:
    value = s.value[row].clone()
    size = value.shape[s.pad_dim] - s.sizes[row]
    if size:
        pad = value.narrow(s.pad_dim, s.sizes[row], size)
        if pad.is_floating_point() or pad.is_complex():
            pad.normal_(generator=torch.Generator(pad.device).manual_seed(row)).mul_(1e3).add_(7)
        else:
            pad.fill_(7)
    return value


def _tensors(row: RowFunction, r: int, weights: dict[str, torch.Tensor], how: str
             ) -> dict[str, torch.Tensor]:
    out = {f"inner.{k}": weights[path] for k, path in row.shared.items()}
    for s in row.stacked:
        if s.pad_dim is None:
            value = s.value[r].clone()
        elif how == "own":
            value = s.part(r).clone()
        elif how == "zeros":
            value = s.value[r].clone()
        else:
            value = _garbage(s, r)
        out[f"inner.{s.name}"] = value
    return out


def _cut(want: Any, got: Any) -> Cut | str | None:
    """How ``got`` (a padded run's value) is cut back to ``want``'s shape, or why not:
    ``"shape"`` (no narrowing gives it), ``"size"`` (a number differs)."""
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        if want.dim() != got.dim() or any(w > g for w, g in zip(want.shape, got.shape)):
            return "shape"
        return tuple((d, w) for d, (w, g) in enumerate(zip(want.shape, got.shape)) if w != g)
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        return "shape"
    return None if want == got else "size"


def _narrowed(value: torch.Tensor, cut: Cut) -> torch.Tensor:
    for dim, size in cut:
        value = value.narrow(dim, 0, size)
    return value


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
    return torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)


def _agree(own: Any, zeros: Any, garbage: Any) -> str | list[Cut]:
    """``""``-free verdict for one op: the cuts of its tensors, or a reason word."""
    leaves = [pytree.tree_flatten(v) for v in (own, zeros, garbage)]
    if len({str(spec) for _, spec in leaves}) > 1:
        return "shape"
    cuts = []
    for w, z, g in zip(*(values for values, _ in leaves)):
        cut = _cut(w, z)
        if isinstance(cut, str):
            return cut
        if cut is None:
            continue
        if tuple(g.shape) != tuple(z.shape):
            return "shape"
        if not _close(_narrowed(z, cut), w) or not _close(_narrowed(g, cut), w):
            return "values"
        cuts.append(cut)
    return cuts


def _op(row: RowFunction, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(row.module.get_submodule(str(node.target))).__name__
    target = getattr(node.target, "overloadpacket", node.target)   # aten.softmax.int: softmax
    return getattr(target, "__name__", str(target))


_WHY = {"values": "reduces over the padded axis", "size": "reads the padded size",
        "shape": "changes the shape so that its result cannot be sliced back"}


def _run(runner: _Runner, row: RowFunction, tensors: dict[str, torch.Tensor],
         args: list[Any]) -> dict[fx.Node, Any]:
    try:
        with torch.no_grad():
            return functional_call(runner, tensors, tuple(args))
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        op = _op(row, runner.current) if runner.current is not None else "the row"
        text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise Refused(f"{_PREFIX}: `{op}` fails on the padded tensors "
                      f"({type(exc).__name__}: {text})") from exc


def check_padding(row: RowFunction, plan: RowPlan, args: list[list[Any]],
                  weights: dict[str, torch.Tensor]) -> tuple[tuple[Cut, ...], ...]:
    """Per row, per leaked value, the cut that gives the row's own result back.

    Args:
        row: the row function with its padded, stacked tensors.
        plan: the rows.
        args: per row, the row function's arguments (real values).
        weights: the shared modules' tensors, by path.

    Raises:
        Refused: an op's kept values depend on the padding (see the module docstring).
    """
    runner, cuts = _Runner(row.module), []
    for r in range(plan.size):
        runs = [_run(runner, row, _tensors(row, r, weights, how), args[r])
                for how in ("own", "zeros", "garbage")]
        for node in row.module.graph.nodes:
            if node not in runs[0]:
                continue
            verdict = _agree(*(run[node] for run in runs))
            if isinstance(verdict, str):
                op = "the row's result" if node.op == "output" else f"`{_op(row, node)}`"
                raise Refused(f"{_PREFIX}: {op} {_WHY[verdict]}")
        output = next(n for n in row.module.graph.nodes if n.op == "output")
        cuts.append(tuple(_cut(w, z) or () for w, z in zip(runs[0][output], runs[1][output])))
    return tuple(cuts)
