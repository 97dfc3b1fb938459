"""What the installed torch can do, detected by feature, never by version number.

fxfuse runs on every torch from the floor in ``pyproject.toml`` on. Where a capability is
absent, the stand-in is chosen here and said once, in one log line (``fxfuse`` logger,
INFO). (torch's deprecation warnings from fxfuse's own calls are muted in
:mod:`fxfuse.running`.)
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator

import torch

log = logging.getLogger("fxfuse")

#: ``torch.export.Dim.AUTO`` (export decides which dims stay dynamic); absent in torch 2.4,
#: where ``torch.export.Dim`` is a function that makes named dims.
HAS_DIM_AUTO = hasattr(torch.export.Dim, "AUTO")

#: ``torch.export`` to the graph that keeps in-place writes as ``copy_`` (the training IR):
#: ``torch.export.export`` from torch 2.6 on; on torch 2.5 ``export`` functionalises them
#: into ``select_scatter``/``slice_scatter`` chains and ``export_for_training`` keeps them
#: (torch 2.6 has both, alike here; torch 2.13 has ``export`` only).
export_training_ir = getattr(torch.export, "export_for_training", torch.export.export)

_said: set[str] = set()


def say_absent(capability: str, instead: str) -> None:
    """One log line, once per process: ``capability`` is absent, ``instead`` is used."""
    if capability in _said:
        return
    _said.add(capability)
    log.info("torch %s has no %s; %s", torch.__version__, capability, instead)


class BatchDims:
    """The dynamic-shape entry for dim 0 of each batched example tensor.

    ``torch.export.Dim.AUTO`` where torch has it. Otherwise a named ``Dim`` per distinct
    example batch size (``batch``, ``batch_1``, ...): tensors with the same batch size
    share one, so export sees them as equal, as a batch is.
    """

    def __init__(self) -> None:
        self._named: dict[int, Any] = {}

    def __call__(self, x: torch.Tensor) -> Any:
        if HAS_DIM_AUTO:
            return torch.export.Dim.AUTO
        say_absent("torch.export.Dim.AUTO",
                   "the batch dim is exported as a named Dim, shared by inputs of one batch size")
        size = int(x.shape[0])
        if size not in self._named:
            name = "batch" if not self._named else f"batch_{len(self._named)}"
            # below the default top: torch 2.5's slices guard ``size != 2**63 - 1``
            self._named[size] = torch.export.Dim(name, max=sys.maxsize - 1)
        return self._named[size]


@contextlib.contextmanager
def muted_logger(name: str, below: int = logging.ERROR) -> Iterator[None]:
    """Drop the records under ``below`` that torch's logger ``name`` emits in the block
    (``torch.export.load`` logs a traceback at WARNING before it reads a flat archive)."""
    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= below
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
