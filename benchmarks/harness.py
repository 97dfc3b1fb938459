"""Timing, throughput and memory measurement shared by the benchmark scripts.

Timings follow the house rules for noisy shared machines: every candidate is warmed
up, then measured in interleaved rounds (A, B, C, A, B, C, ...) with
``torch.utils.benchmark.Timer`` (which synchronises CUDA itself); a round runs the
candidate ``number`` times, with ``number`` chosen so one round lasts about
``target_round_s``. Medians and quartiles are taken over rounds, and speedups are
taken round by round (paired ratios), so slow drifts of the machine cancel out.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.benchmark import Timer

from fxfuse.check import bench

Fn = Callable[[torch.Tensor], Any]


@dataclass
class Timing:
    """Per-round seconds per call of one candidate."""

    name: str
    number: int                  # calls per round (0: chosen by the timer per round)
    rounds_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median over rounds, seconds per call."""
        return statistics.median(self.rounds_s)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(q1, q3) over rounds, seconds per call."""
        return quartiles(self.rounds_s)


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method); both equal the value for one sample."""
    timing = bench.timing_of(values)
    return timing.q1_s, timing.q3_s


def setup_device(device: str) -> list[str]:
    """Prepare ``device`` for timing; returns notes for the report header."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        torch.backends.cudnn.benchmark = True
        return [f"GPU {torch.cuda.get_device_name()}", "torch.backends.cudnn.benchmark = True"]
    return [f"{torch.get_num_threads()} intra-op threads"]


def time_interleaved(fns: dict[str, Fn], x: torch.Tensor, *, rounds: int = 15,
                     warmup: int = 3, target_round_s: float = 0.03) -> dict[str, Timing]:
    """Time every callable on ``x`` in interleaved rounds, under ``torch.inference_mode``
    (:func:`fxfuse.check.bench.time_interleaved`, the pass's own timer).

    Args:
        fns: candidate name -> callable taking the input tensor.
        x: the input every candidate runs on.
        rounds: measured rounds per candidate.
        warmup: untimed calls per candidate before calibration.
        target_round_s: wanted length of one round.

    Returns:
        Candidate name -> :class:`Timing` (seconds per call, one entry per round).
    """
    def bound(fn: Fn) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return fn(x)
        return call

    samples = bench.time_interleaved({name: bound(fn) for name, fn in fns.items()},
                                     rounds=rounds, round_s=target_round_s, warmup=warmup)
    return {name: Timing(name, 0, list(values)) for name, values in samples.items()}


def paired_speedup(base: Timing, other: Timing) -> tuple[float, float, float]:
    """Speedup of ``other`` over ``base``: median, q1, q3 of the per-round ratios."""
    ratios = [b / o for b, o in zip(base.rounds_s, other.rounds_s)]
    q1, q3 = quartiles(ratios)
    return statistics.median(ratios), q1, q3


def matmul_peak_gflops(device: str, n: int | None = None, min_run_time: float = 1.0) -> float:
    """Measured fp32 ``torch.mm`` throughput of an n x n product, GFLOP/s (median)."""
    n = n or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    c = torch.empty(n, n, device=device)
    timer = Timer(stmt="torch.mm(a, b, out=c)", globals={"torch": torch, "a": a, "b": b, "c": c},
                  num_threads=torch.get_num_threads())
    timer.timeit(2)
    return 2 * n ** 3 / timer.blocked_autorange(min_run_time=min_run_time).median / 1e9


def conv_flops(B: int, C: int, H: int, W_out: int, k: int, C_out: int) -> int:
    """Multiply-add FLOPs of H row convs: ``2 * B * H * C_out * W_out * C * k`` (bias ignored)."""
    return 2 * B * H * C_out * W_out * C * k


def peak_memory_bytes(fn: Fn, x: torch.Tensor) -> int | None:
    """Peak bytes torch allocates during one call of ``fn(x)``, above what was live before.

    Counts activations, workspaces and the output; weights and ``x`` are already live
    and are not counted. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation
    events the profiler records with ``profile_memory=True``. None if it cannot tell.
    """
    with torch.inference_mode():
        fn(x)
        if x.is_cuda:
            return _cuda_peak(fn, x)
        return _cpu_peak(fn, x)


def _cuda_peak(fn: Fn, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn(x)
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


def _cpu_peak(fn: Fn, x: torch.Tensor) -> int | None:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(x)
    del out
    try:
        from torch._C._profiler import _EventType
        events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
        allocs = sorted((e.start_time_ns, e.extra_fields.alloc_size) for e in events
                        if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu")
    except (AttributeError, ImportError):  # private profiler API moved: no number
        return None
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak


def _walk(events: list[Any]) -> Any:
    for event in events:
        yield event
        yield from _walk(event.children)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's start/stop lines come from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
