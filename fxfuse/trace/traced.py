"""What tracing returns: a value, not attributes on the GraphModule."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..weightmap import WeightMap

# gm.meta key: the tracer that made the graph. It stays with the module (deep copies,
# files) because it is a property of the program: an exported graph's guards fix shapes.
TRACER_KEY = "fxfuse_tracer"


@dataclass(frozen=True)
class Traced:
    """A traced model.

    Attributes:
        gm: the GraphModule; every node carries ``meta["tensor_meta"]``.
        tracer: ``"symbolic"``, ``"export"`` or ``"realtensor"`` (make_fx).
        notes: what the trace did that a user should know (defaults bound, inputs
            copied, the route taken).
        renames: state the trace moved to another path, mapped back to the model's.
        fixed_mode: ``"train"`` / ``"eval"`` when the graph runs in that mode only
            (export bakes the mode in), else ``""``.
    """

    gm: fx.GraphModule
    tracer: str = "symbolic"
    notes: tuple[str, ...] = ()
    renames: WeightMap = field(default_factory=WeightMap)
    fixed_mode: str = ""

    @property
    def exported(self) -> bool:
        """The graph is an ATen program whose shapes and mode its guards fix."""
        return self.tracer == "export"


def tracer_of(module: object) -> str | None:
    """The tracer recorded on a traced module (``None``: not a traced module)."""
    meta = getattr(module, "meta", None)
    return meta.get(TRACER_KEY) if isinstance(meta, dict) else None
