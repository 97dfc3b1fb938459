"""Per-row op kinds, one module each, registered by name (see :mod:`.base`).

Recognition tries the kinds in registration order; the first that recognises a node wins.
To add a kind: write ``kinds/<name>.py`` with a ``@register("<name>")`` :class:`RowKind`
subclass and import it below.
"""
from __future__ import annotations

from torch import fx, nn

from .base import REGISTRY, Lane, RowKind, RowOp, register, twin_key
from . import (conv, linear, batchnorm, layernorm, groupnorm, pad, pointwise,  # noqa: F401,E402
               pool, rawparam, binary)

__all__ = ["REGISTRY", "Lane", "RowKind", "RowOp", "register", "row_op", "twin_key"]


def row_op(node: fx.Node, root: nn.Module) -> RowOp | None:
    """Describe ``node`` as a per-row op fxfuse can fuse, or None."""
    for kind in REGISTRY.values():
        op = kind.recognise(node, root)
        if op is not None:
            return op
    return None
