"""What the rows read, at two batch sizes: the example batch and one more.

The graph is run once per batch size (an fx Interpreter, no gradients, buffers restored
afterwards) and the values of the nodes asked for are kept as empty tensors of the same
shape, dtype, strides and device (or as the value itself for sizes and other small
values). Two batch sizes tell which numbers in the vectorised code are the batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..check.runs import fresh_inputs


@dataclass(frozen=True)
class Probe:
    """The recorded values: ``first`` at the example batch, ``second`` at ``batch2``
    (empty when the model does not run at another batch); ``kept``: the values
    themselves at the example batch, for the nodes asked to keep and the integer tensors."""

    batch1: int | None
    batch2: int | None
    first: dict[fx.Node, Any]
    second: dict[fx.Node, Any]
    kept: dict[fx.Node, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorLike:
    """A tensor's shape, strides, dtype and device (its values are not kept)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    def empty(self) -> torch.Tensor:
        """An uninitialised tensor with these facts (for tracing on fake tensors)."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype,
                                   device=self.device)


def _like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorLike(tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return value


def _index(value: Any) -> bool:
    """An integer tensor (the index inputs are kept, for :mod:`bounds`)."""
    return isinstance(value, torch.Tensor) and not value.is_floating_point() \
        and not value.is_complex() and value.dtype != torch.bool


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node],
                 keep: frozenset[fx.Node] = frozenset()) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.keep = wanted, keep
        self.seen: dict[fx.Node, Any] = {}
        self.kept: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = pytree.tree_map(_like, result)
        if n in self.keep or (n in self.wanted and _index(result)):
            self.kept[n] = pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, result)
        return result


@contextlib.contextmanager
def _state_kept(module: torch.nn.Module) -> Iterator[None]:
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            for key, buffer in module.named_buffers():
                if key in saved:
                    buffer.copy_(saved[key])


def _recorded(gm: fx.GraphModule, inputs: tuple[Any, ...], wanted: set[fx.Node],
              keep: frozenset[fx.Node] = frozenset()) -> _Recorder:
    recorder = _Recorder(gm, wanted, keep)
    with _state_kept(gm), torch.no_grad():
        recorder.run(*inputs)
    return recorder


def record(gm: fx.GraphModule, inputs: tuple[Any, ...], wanted: set[fx.Node]) -> dict:
    """The values of ``wanted`` when ``gm`` runs on ``inputs`` (state left as it was)."""
    return _recorded(gm, inputs, wanted).seen


def batch_of(inputs: tuple[Any, ...]) -> int | None:
    """The size of the first tensor input's dim 0."""
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def probe(gm: fx.GraphModule, inputs: tuple[Any, ...], wanted: set[fx.Node], *,
          batched: tuple[bool, ...] | None = None,
          keep: frozenset[fx.Node] = frozenset()) -> Probe:
    """Record ``wanted`` at the example batch and at that batch plus two (``batched``:
    which inputs carry the batch; the others are passed as they are); the values of
    ``keep`` at the example batch are kept as they are."""
    recorder = _recorded(gm, inputs, wanted, keep)
    first, kept = recorder.seen, recorder.kept
    mask = batched if batched is not None else (True,) * len(inputs)
    batch = batch_of(tuple(x for x, b in zip(inputs, mask) if b))
    if batch is None:
        return Probe(None, None, first, {}, kept)
    other = batch + 2
    fresh = iter(fresh_inputs(tuple(x for x, b in zip(inputs, mask) if b), other, seed=7))
    try:
        second = record(gm, tuple(next(fresh) if b else x for x, b in zip(inputs, mask)), wanted)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError):
        # the model runs at its example batch only: the vectorised code stays static
        return Probe(batch, None, first, {}, kept)
    return Probe(batch, other, first, second, kept)
