"""The implementations compared per shape, each built from one ``RowConvLoop``.

A candidate that cannot be built (``torch.compile`` fails or runs out of time,
``fxfuse.fuse`` is missing or raises) comes back with ``fn=None`` and the reason in
``note``; the sweep records it as "n/a" and goes on.
"""
from __future__ import annotations

import contextlib
import copy
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from models import HandGrouped, RowConvLoop, VmapRows

CANDIDATES = ("loop", "hand_grouped", "hand_contiguous", "compile", "compile(fxfuse)", "vmap", "fxfuse")


@dataclass
class Candidate:
    """One implementation ready to time, or the reason it is not.

    Attributes:
        name: one of :data:`CANDIDATES`.
        fn: callable taking the input tensor; None when unavailable.
        note: why it is unavailable, or facts worth reporting (fallbacks).
        chosen: for fxfuse, the lowering of the first site.
        setup_s: seconds spent building it (compile time, pass time), if measured.
    """

    name: str
    fn: Callable[[torch.Tensor], Any] | None
    note: str = ""
    chosen: str = ""
    setup_s: float | None = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (no limit if <= 0).

    The error is raised again every second until it leaves the block, since library
    code (Inductor's cache loading, for one) may catch and swallow the first one.
    """
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def _expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fxfuse_backend() -> Any:
    try:
        import fxfuse
        return fxfuse.backend()            # the pass on Dynamo's graph, then Inductor
    except (ImportError, AttributeError):
        return None


def build_compile(loop: RowConvLoop, x: torch.Tensor, timeout_s: float,
                  name: str = "compile") -> Candidate:
    """``torch.compile`` of the loop (``compile(fxfuse)``: with the fxfuse backend, which
    rewrites the captured graph and hands it to Inductor), compiled by one call under
    ``inference_mode``."""
    if name == "compile":  # fresh cache per shape: no recompile limit, no dynamic shapes
        torch._dynamo.reset()
    backend = "inductor" if name == "compile" else _fxfuse_backend()
    if backend is None:
        return Candidate(name, None, note="fxfuse.backend not available")
    start = time.perf_counter()
    try:
        compiled = torch.compile(copy.deepcopy(loop) if name != "compile" else loop,
                                 backend=backend, dynamic=False)
        with time_limit(timeout_s), torch.inference_mode():
            compiled(x)
    except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
        torch._dynamo.reset()
        if "TimeoutError" in _one_line(exc):
            return Candidate(name, None, note=f"compile took over {timeout_s:g} s "
                             "(--compile-timeout)")
        return Candidate(name, None, note=f"compile failed: {_one_line(exc)}")
    seconds = time.perf_counter() - start
    graphs = getattr(backend, "graphs", None)
    chosen = ""
    if graphs:
        chosen = ",".join(s.lowering for s in graphs[-1].sites) or graphs[-1].unchanged_because
    return Candidate(name, compiled, note=f"compiled in {seconds:.1f} s", chosen=chosen,
                     setup_s=seconds)


def _fuse_function() -> Callable[..., Any] | None:
    try:
        import fxfuse
    except ImportError:
        return None
    return getattr(fxfuse, "fuse", None)


def build_fxfuse(loop: RowConvLoop, x: torch.Tensor, lowering: str = "auto") -> Candidate:
    """``fxfuse.fuse(loop, (x,), lowering=..., verify=False, benchmark=False).model``.

    Falls back to ``lowering="grouped"`` when ``"auto"`` is rejected (ConfigError and
    ValueError); the fallback is named in the note.
    """
    fuse = _fuse_function()
    if fuse is None:
        return Candidate("fxfuse", None, note="fxfuse.fuse not available")
    note = ""
    loop = copy.deepcopy(loop)  # never let the pass touch the "loop" baseline
    start = time.perf_counter()
    try:
        try:
            result = fuse(loop, (x,), lowering=lowering, verify=False, benchmark=False)
        except ValueError as exc:  # fxfuse.ConfigError is a ValueError
            if lowering != "auto":
                raise
            note = f"'auto' rejected ({_one_line(exc)}); used 'grouped'"
            start = time.perf_counter()
            result = fuse(loop, (x,), lowering="grouped", verify=False, benchmark=False)
    except Exception as exc:  # noqa: BLE001 - report, keep sweeping
        return Candidate("fxfuse", None, note=f"fuse failed: {_one_line(exc)}")
    seconds = time.perf_counter() - start
    sites = getattr(result, "sites", None) or []
    chosen = str(getattr(sites[0], "lowering", "")) if sites else ""
    note = "; ".join(filter(None, [f"fuse took {seconds:.1f} s", note]))
    return Candidate("fxfuse", result.model, note=note, chosen=chosen, setup_s=seconds)


def build_candidates(loop: RowConvLoop, x: torch.Tensor, *, compile_: bool = True,
                     compile_timeout_s: float = 300.0, lowering: str = "auto") -> list[Candidate]:
    """Every candidate of :data:`CANDIDATES` for this loop and input, in that order."""
    loop.eval()
    found = [Candidate("loop", loop), Candidate("hand_grouped", HandGrouped(loop).eval()),
             Candidate("hand_contiguous", HandGrouped(loop, contiguous=True).eval(),
                       note="the hand-written grouped conv with a contiguous output, as the loop's")]
    if compile_:
        found.append(build_compile(loop, x, compile_timeout_s))
        found.append(build_compile(loop, x, compile_timeout_s, "compile(fxfuse)"))
    else:
        found += [Candidate(n, None, note="skipped (--no-compile)")
                  for n in ("compile", "compile(fxfuse)")]
    found.append(Candidate("vmap", VmapRows(loop).eval()))
    found.append(build_fxfuse(loop, x, lowering))
    return found


def max_abs_error(fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
                  want: torch.Tensor) -> float:
    """Largest absolute difference between ``fn(x)`` and ``want`` (inf on shape mismatch)."""
    with torch.inference_mode():
        got = fn(x)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return float("inf")
    return (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
