"""The pass's options, validated once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

LOWERING_CHOICES = ("auto", "grouped", "grouped2d", "im2col", "vmap")
TRACER_CHOICES = ("auto", "symbolic", "export")


@dataclass(frozen=True)
class FuseConfig:
    """Options of :func:`fxfuse.fuse`.

    Attributes:
        lowering: ``"grouped"`` (one grouped ``Conv1d`` per site), ``"grouped2d"`` (a
            grouped ``Conv2d`` (1, k) on a channels-last view), ``"im2col"`` (unfold +
            batched matmul) or ``"auto"`` (time the candidates per site, keep the loop
            when nothing beats it).
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
            (doubled until the decision holds or the time budget is spent).
        decisions: recorded ``auto`` decisions (a previous ``FuseResult.decisions``),
            reused for sites with the same structure, shapes, dtype, device and torch.
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
    decisions: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        for name, check in _VALIDATORS:
            problem = check(name, getattr(self, name))
            if problem is not None:
                raise ConfigError(problem)


def _choice(choices: tuple[str, ...]):
    """A validator: the value is one of ``choices``."""
    def check(name: str, value: Any) -> str | None:
        if value not in choices:
            return f"{name}={value!r} is not one of {', '.join(choices)}"
        return None
    return check


def _positive_int(name: str, value: Any) -> str | None:
    """An int (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{name} must be an int >= 1, got {value!r}"
    return None


def _flag(name: str, value: Any) -> str | None:
    """Exactly True or False."""
    if not isinstance(value, bool):
        return f"{name} must be True or False, got {value!r}"
    return None


def _mapping_or_none(name: str, value: Any) -> str | None:
    """None, or a mapping of argument name to value."""
    if value is not None and not isinstance(value, Mapping):
        return (f"{name} must be a dict of argument name to value, got "
                f"{type(value).__name__}")
    return None


def _recorded(name: str, value: Any) -> str | None:
    """None, or recorded decisions (a ``FuseResult.decisions`` dict)."""
    if value is not None and not isinstance(value, Mapping):
        return (f"{name} must be the dict of a previous result.decisions (or read from a "
                f"--decisions file), got {type(value).__name__}")
    return None


def _tolerance(name: str, value: Any) -> str | None:
    """None, or a non-negative number."""
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        return f"{name} must be a non-negative number, got {value!r}"
    return None


# Checked in this order; the first problem found is the one reported.
_VALIDATORS = (
    ("lowering", _choice(LOWERING_CHOICES)),
    ("tracer", _choice(TRACER_CHOICES)),
    ("min_rows", _positive_int),
    ("bench_rounds", _positive_int),
    ("auto_rounds", _positive_int),
    ("verify", _flag),
    ("benchmark", _flag),
    ("inplace", _flag),
    ("check_grads", _flag),
    ("concrete_args", _mapping_or_none),
    ("decisions", _recorded),
    ("rtol", _tolerance),
    ("atol", _tolerance),
)


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
