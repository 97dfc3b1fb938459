"""What a call is doing, stage by stage (trace, match, timing per site, rewrite, verify,
benchmark, write), with the time since the call began.

Every stage is logged on ``logging.getLogger("fxfuse")`` at INFO (silent unless the caller
turns that logger on) and handed to the listeners registered with :func:`listening`:
the command line registers one that prints each stage on stderr.

Example::

    import logging
    logging.basicConfig()
    logging.getLogger("fxfuse").setLevel(logging.INFO)
    fxfuse.fuse(model, (x,))      # fxfuse: tracing (0.0s) ... verifying (1.9s) ...
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger("fxfuse")

Listener = Callable[[str], None]
_listeners: list[Listener] = []
_lock = threading.Lock()
_clock = {"depth": 0, "start": time.monotonic()}


@contextlib.contextmanager
def timed_call() -> Iterator[None]:
    """Elapsed times count from the start of the outermost call (a nested one keeps it)."""
    with _lock:
        if _clock["depth"] == 0:
            _clock["start"] = time.monotonic()
        _clock["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _clock["depth"] -= 1


def stage(message: str) -> None:
    """Log ``message`` with the elapsed time and pass it to every listener."""
    log.info("%s (%.1fs)", message, time.monotonic() - _clock["start"])
    for listener in tuple(_listeners):
        listener(message)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(message)`` for every stage while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
