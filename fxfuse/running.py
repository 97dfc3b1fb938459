"""What every public entry point of fxfuse wraps around its work.

- torch's ``FutureWarning``/``DeprecationWarning`` raised by fxfuse's own calls into
  torch (``LeafSpec`` when an exported graph is copied, and the like) are muted while
  fxfuse runs, and only then: the filters are added when the first call starts and
  removed when the last one ends (counted, so threads calling at once are safe, where
  ``warnings.catch_warnings`` is not);
- attributes ``copy.deepcopy`` cannot copy (a ``threading.Lock``) are shared between the
  model's copies (:mod:`fxfuse.trace.sharing`), with a note on the result;
- calls from several threads run one at a time: ``torch.fx.symbolic_trace`` patches
  ``torch.nn.Module.__call__`` and module globals process-wide while it traces, and
  ``torch.export`` imports Dynamo lazily, so any model run (verification, timing, shape
  propagation) or trace in another thread at the same moment sees the patched methods
  or a half-imported module (``NameError: module is not installed as a submodule``,
  ShapeProp errors). One re-entrant lock (:data:`PIPELINE`) around each call removes
  that; the work itself is mostly in torch kernels, which use every core anyway;
- running out of memory is a :class:`~fxfuse.errors.ResourceError` naming what ran out
  and how much was asked for, not an internal error.
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
from typing import Any, Iterator

from .errors import ResourceError

_FILTERS = (("ignore", None, FutureWarning, None, 0),
            ("ignore", None, DeprecationWarning, None, 0))
_lock = threading.Lock()
_depth = 0
PIPELINE = threading.RLock()      # one fxfuse call at a time in this process


@contextlib.contextmanager
def torch_warnings_muted() -> Iterator[None]:
    """Mute Future/Deprecation warnings while the block runs (see the module doc)."""
    global _depth
    with _lock:
        if _depth == 0:
            warnings.filters[:0] = list(_FILTERS)
            warnings._filters_mutated()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for entry in _FILTERS:
                    with contextlib.suppress(ValueError):
                        warnings.filters.remove(entry)
                warnings._filters_mutated()


_CPU_OOM = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_GPU_OOM = re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)")


def out_of_memory(exc: BaseException, doing: str) -> ResourceError | None:
    """A ResourceError for ``exc`` when it is an out-of-memory failure, else None."""
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        found = _GPU_OOM.search(text)
        size = f" (it tried to allocate {found.group(1)})" if found else ""
        return ResourceError(f"out of GPU memory while {doing}{size}; use a smaller "
                             "--input-shape batch, free the GPU, or run on the CPU")
    found = _CPU_OOM.search(text)
    if found or isinstance(exc, MemoryError):
        size = f" (it tried to allocate {_human(int(found.group(1)))})" if found else ""
        return ResourceError(f"out of CPU memory while {doing}{size}; use a smaller input "
                             "(batch or sizes), or a machine with more memory")
    return None


@contextlib.contextmanager
def running(model: Any, doing: str = "fusing the model") -> Iterator[tuple[str, ...]]:
    """The context of one fxfuse call on ``model``; yields notes for the result."""
    from .trace.sharing import sharing_note, shared_on_copy, uncopyable_attributes
    with PIPELINE, torch_warnings_muted():
        try:
            found = uncopyable_attributes(model) if model is not None else []
        except RecursionError:   # nested too deeply: the copy itself says so, in one line
            found = []
        types = {t for _, _, kinds in found for t in kinds}
        try:
            with shared_on_copy(types):
                yield (sharing_note(found),) if found else ()
        except Exception as exc:  # noqa: BLE001 - looked at, then raised again
            problem = resource_problem(exc, doing)
            if problem is None or isinstance(exc, ResourceError):
                raise
            raise problem from exc


def resource_problem(exc: BaseException, doing: str) -> ResourceError | None:
    """A ResourceError when ``exc`` or one of its causes is an out-of-memory failure."""
    return next((p for p in (out_of_memory(e, doing) for e in _chain(exc)) if p is not None),
                None)


def _human(n: int) -> str:
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024 or unit == "EiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}" if unit != "bytes" else f"{n} bytes"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (a trace error wrapping an out-of-memory, say)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def quiet_import(name: str) -> Any:
    """Import ``name`` with stderr and warnings held (some torch builds print "No CUDA
    runtime is found" when ``torch.utils.benchmark`` is first imported); what was held is
    logged at DEBUG."""
    import importlib
    import io
    import logging
    import sys
    if name in sys.modules:
        return sys.modules[name]
    held = io.StringIO()
    with _lock_import, contextlib.redirect_stderr(held), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    if held.getvalue().strip():
        logging.getLogger("fxfuse").debug("importing %s printed: %s", name, held.getvalue())
    return module


_lock_import = threading.RLock()
