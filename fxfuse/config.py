"""The pass's options, validated once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

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
        auto_rounds: interleaved rounds for each site's timing under ``lowering="auto"``
            (more are run when the first rounds are too close to call).
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
    auto_rounds: int = 9

    def __post_init__(self) -> None:
        if self.lowering not in LOWERING_CHOICES:
            raise ConfigError(f"lowering={self.lowering!r} is not one of "
                              f"{', '.join(LOWERING_CHOICES)}")
        if self.tracer not in TRACER_CHOICES:
            raise ConfigError(f"tracer={self.tracer!r} is not one of {', '.join(TRACER_CHOICES)}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) \
                or self.min_rows < 1:
            raise ConfigError(f"min_rows must be an int >= 1, got {self.min_rows!r}")
        for name in ("bench_rounds", "auto_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("verify", "benchmark", "inplace", "check_grads"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.concrete_args is not None and not isinstance(self.concrete_args, Mapping):
            raise ConfigError("concrete_args must be a dict of argument name to value, got "
                              f"{type(self.concrete_args).__name__}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")


def merge_config(config: FuseConfig | None = None, **overrides: Any) -> FuseConfig:
    """``config`` (or the defaults) with ``overrides`` applied, validated once.

    Args:
        config: a :class:`FuseConfig`, or None for the defaults.
        **overrides: field values given explicitly; they win over ``config``'s.

    Returns:
        The merged, validated :class:`FuseConfig`.

    Raises:
        ConfigError: ``config`` is not a FuseConfig, an override names no field, or a
            value is bad.
    """
    if config is None:
        config = FuseConfig()
    elif not isinstance(config, FuseConfig):
        raise ConfigError(f"config must be a fxfuse.FuseConfig, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(FuseConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; options are {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides) if overrides else config
