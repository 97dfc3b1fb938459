"""The pass's options, validated once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LOWERING_CHOICES = ("auto", "grouped", "grouped2d")
TRACER_CHOICES = ("auto", "symbolic", "export")


@dataclass(frozen=True)
class FuseConfig:
    """Options of :func:`fxfuse.fuse`.

    Attributes:
        lowering: ``"grouped"`` (one grouped ``Conv1d`` per site), ``"grouped2d"`` (a
            grouped ``Conv2d`` (1, k) on a channels-last view) or ``"auto"`` (time the
            candidates per site, keep the loop when nothing beats it).
        verify: compare the rewritten model with the original; refuse on mismatch.
        benchmark: time the original and the rewritten model.
        inplace: reuse the given model's modules instead of deep-copying it first.
        min_rows: loops with fewer rows are left alone.
        tracer: ``"auto"`` (``symbolic_trace``, then ``torch.export``), ``"symbolic"``
            or ``"export"``.
        concrete_args: passed to ``torch.fx.symbolic_trace``.
        check_grads: in verification, also compare gradients in train mode.
        rtol, atol: override the per-dtype verification tolerances.
        bench_rounds: interleaved rounds for the timing.
    """

    lowering: str = "auto"
    verify: bool = True
    benchmark: bool = True
    inplace: bool = False
    min_rows: int = 2
    tracer: str = "auto"
    concrete_args: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    check_grads: bool = True
    rtol: float | None = None
    atol: float | None = None
    bench_rounds: int = 15

    def __post_init__(self) -> None:
        if self.lowering not in LOWERING_CHOICES:
            raise ConfigError(f"lowering={self.lowering!r} is not one of "
                              f"{', '.join(LOWERING_CHOICES)}")
        if self.tracer not in TRACER_CHOICES:
            raise ConfigError(f"tracer={self.tracer!r} is not one of {', '.join(TRACER_CHOICES)}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) \
                or self.min_rows < 1:
            raise ConfigError(f"min_rows must be an int >= 1, got {self.min_rows!r}")
        if not isinstance(self.bench_rounds, int) or self.bench_rounds < 1:
            raise ConfigError(f"bench_rounds must be an int >= 1, got {self.bench_rounds!r}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
