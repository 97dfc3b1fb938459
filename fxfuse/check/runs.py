"""Running a model the way every check does: on copies of its inputs, from one RNG seed,
on fresh inputs of another batch size; and finding the random ops in a graph."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree


def clone_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Fresh copies (the same tensor passed twice stays one tensor), so a forward that
    writes into its input changes nobody's tensors."""
    clones: dict[int, torch.Tensor] = {}

    def clone(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return clones.setdefault(id(v), v.detach().clone())
        return v
    return tuple(pytree.tree_map(clone, list(inputs)))


def run(model: Callable, inputs: Sequence[Any], seed: int) -> Any:
    """``model(*inputs)`` on copies of the inputs, from RNG seed ``seed`` (the caller's
    RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(*clone_inputs(inputs))


def fresh_inputs(inputs: Sequence[Any], batch: int | None, seed: int) -> tuple[Any, ...]:
    """New random tensors shaped like ``inputs`` (dim 0 set to ``batch`` unless None):
    one distinct tensor per argument and per nested element; integer inputs are
    rows of the originals; non-tensors are kept."""
    gen = torch.Generator().manual_seed(seed)

    def fresh(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        shape = tuple(x.shape) if batch is None or x.dim() == 0 else (batch, *x.shape[1:])
        if x.is_floating_point() or x.is_complex():
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
        if x.dim() == 0 or x.shape[0] == 0:
            return x.clone()
        rows = torch.randint(0, x.shape[0], (shape[0],), generator=gen)
        return x[rows.to(x.device)].clone()

    return tuple(pytree.tree_map(fresh, list(inputs)))


_RANDOM_WORDS = ("dropout", "rand", "bernoulli", "normal")


def random_nodes(model: torch.nn.Module, *, inserted: bool = False) -> list[str]:
    """The functional random ops in a graph (their draws depend on how rows are batched)
    not switched off by ``training=False``; with ``inserted``, also the dropout modules
    an export trace put in for functional dropout."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    found = []
    for node in graph.nodes:
        if node.op == "call_module":
            if inserted and str(node.target).startswith("fxfuse_dropout"):
                found.append(node.name)
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and any(w in name for w in _RANDOM_WORDS):
            training = node.kwargs.get("training", node.kwargs.get("train", True))
            if training is not False:
                found.append(node.name)
    return found
