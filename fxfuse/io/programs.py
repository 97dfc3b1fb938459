"""What a loaded ``torch.export`` program says about its own inputs: the example inputs
it was exported with, and which input dims it accepts at more than one size (with their
ranges), so a ``.pt2`` needs no ``--input-shape`` and its dynamic dims can be kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class DynamicDim:
    """Dim ``dim`` of user input ``index`` (``name``) accepts ``low``..``high``."""

    index: int
    name: str
    dim: int
    symbol: str
    low: Any
    high: Any

    def describe(self) -> str:
        high = "inf" if self.high is None or str(self.high) in ("oo", "int_oo") else self.high
        return f"dim {self.dim} of input {self.name!r} ({self.symbol}, {self.low}..{high})"


@dataclass(frozen=True)
class ProgramShapes:
    """The example inputs a program carries (``None`` when it carries none) and its
    dynamic input dims."""

    example_inputs: tuple[torch.Tensor, ...] | None
    dynamic: tuple[DynamicDim, ...]


def _example_inputs(program: Any) -> tuple[torch.Tensor, ...] | None:
    found = getattr(program, "example_inputs", None)
    if not found:
        return None
    args, kwargs = found
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None          # only positional tensors become --input-shape's equivalent
    return tuple(args)


def _dims(program: Any) -> tuple[DynamicDim, ...]:
    user = list(program.graph_signature.user_inputs)
    ranges = program.range_constraints
    dims = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        value = node.meta.get("val")
        for d, size in enumerate(getattr(value, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            bound = ranges.get(expr)
            dims.append(DynamicDim(user.index(node.name), node.name, d, str(expr),
                                   getattr(bound, "lower", "?"), getattr(bound, "upper", None)))
    return tuple(dims)


def program_shapes(program: Any) -> ProgramShapes:
    """The example inputs and dynamic dims of ``program`` (an ``ExportedProgram``)."""
    return ProgramShapes(_example_inputs(program), _dims(program))


def program_inputs(source: str, shapes: ProgramShapes | None, dtype: torch.dtype | None,
                   device: torch.device) -> tuple[torch.Tensor, ...]:
    """The example inputs a ``.pt2`` carries, cast to ``dtype`` (floating ones) and moved
    to ``device``, for a run given no ``--input-shape``.

    Raises:
        ConfigError: the model is not a ``.pt2`` or carries no positional tensor inputs.
    """
    if shapes is None or shapes.example_inputs is None:
        what = "the .pt2 carries no example inputs" if shapes is not None else \
            "only a .pt2 carries its own example inputs"
        raise ConfigError(f"give --input-shape for {source} ({what}): one per forward() "
                          "input, e.g. --input-shape 32,15,10,100")
    return tuple(x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point()
                      else x.dtype) for x in shapes.example_inputs)
