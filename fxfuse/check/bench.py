"""Time callables side by side: warm-up, interleaved rounds, medians with spread.

Only ratios measured in one process, interleaved (A, B, A, B, ...), mean anything on a
shared machine. Each round times every candidate once (``torch.utils.benchmark.Timer``,
which synchronises CUDA); the per-round ratios give the speedup and its spread.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils import benchmark as tbench
from .precision import matmul_precision

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and interquartile range over rounds."""

    median_s: float
    q1_s: float
    q3_s: float
    rounds: int


@dataclass(frozen=True)
class BenchResult:
    """Original vs fused model; ``speedup`` = original time / fused time (median of the
    per-round ratios), ``speedup_q1``/``speedup_q3`` its interquartile range."""

    original: Timing
    fused: Timing
    speedup: float
    speedup_q1: float
    speedup_q3: float
    settings: dict[str, Any] = field(default_factory=dict)


def timing_settings(device: torch.device | str | None = None) -> dict[str, Any]:
    """The backend settings a timing ran under (they change which kernels run).

    fxfuse times under the caller's settings, never its own: on CUDA the choice of
    convolution algorithm follows ``torch.backends.cudnn.benchmark`` (autotuned on the
    first calls when True, which the warm-up calls absorb), and TF32 decides which
    kernels run in float32; both are recorded so a figure can be read in context.
    """
    settings: dict[str, Any] = {"threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        settings.update({
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": matmul_precision(),
        })
    return settings


def _device_of(inputs: Sequence[Any]) -> torch.device | None:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0]
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 15,
                     round_s: float = 0.02, warmup: int = 3) -> dict[str, list[float]]:
    """Time each callable once per round, in rotating order, for ``rounds`` rounds.

    Args:
        fns: name → zero-argument callable.
        rounds: number of interleaved rounds.
        round_s: target seconds per candidate per round (sets the calls per round).
        warmup: untimed calls per candidate before timing.

    Returns:
        name → seconds per call, one value per round.
    """
    threads = torch.get_num_threads()
    timers = {k: tbench.Timer("fn()", globals={"fn": f}, num_threads=threads)
              for k, f in fns.items()}
    numbers = {}
    for name, timer in timers.items():
        timer.timeit(warmup)
        once = max(timer.timeit(1).median, 1e-7)
        numbers[name] = max(1, min(10_000, int(round_s / once)))
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_round[name].append(timers[name].timeit(numbers[name]).median)
    return per_round


def timing_of(samples: Sequence[float]) -> Timing:
    """Median and quartiles of per-round samples."""
    q1, med, q3 = _quartiles(list(samples))
    return Timing(med, q1, q3, len(samples))


def benchmark_models(original: Callable, fused: Callable, example_inputs: Sequence[Any], *,
                     rounds: int = 15, round_s: float = 0.02) -> BenchResult:
    """Time ``original`` and ``fused`` on ``example_inputs`` under ``inference_mode``.

    Returns:
        A :class:`BenchResult`. Nothing is asserted: speed is reported, never assumed.
    """
    inputs = tuple(example_inputs)

    def run(model: Callable) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return model(*inputs)
        return call

    samples = time_interleaved({"original": run(original), "fused": run(fused)},
                               rounds=rounds, round_s=round_s)
    ratios = [a / b for a, b in zip(samples["original"], samples["fused"])]
    q1, med, q3 = _quartiles(ratios)
    result = BenchResult(timing_of(samples["original"]), timing_of(samples["fused"]), med, q1, q3,
                         timing_settings(_device_of(inputs)))
    log.info("original %.3g ms, fused %.3g ms, speedup %.2fx", result.original.median_s * 1e3,
             result.fused.median_s * 1e3, result.speedup)
    return result
