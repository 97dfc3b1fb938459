"""fxfuse: rewrite per-row Conv1d loops into one grouped convolution, verified and timed.

    import fxfuse
    result = fxfuse.fuse(model, (x,))
    result.model          # a torch.fx.GraphModule with one conv per loop
    print(result.report())

The steps are public too: :func:`traced` (a :class:`Traced`), :func:`trace_model`,
:func:`find_row_sites`, :func:`rewrite_site`, :func:`verify_models`,
:func:`benchmark_models`.

Deploying: :func:`export_onnx` (needs ``pip install "fxfuse[onnx]"``) and
:func:`backend`, the ``torch.compile`` backend (``backend="fxfuse"``).

Every name is imported on first use, so ``import fxfuse`` loads no torch and prints
nothing. Progress is logged on ``logging.getLogger("fxfuse")`` (INFO), quiet by default.
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers; at run time each name loads on first use
    from .api import FuseResult, apply_sites, fuse
    from .check.auto import choose_lowering, extract_loop
    from .check.bench import BenchResult, Timing, benchmark_models, time_interleaved
    from .check.decide import Choice, choose_among
    from .check.verify import VerifyReport, verify_models
    from .config import FuseConfig
    from .match.find import find_row_sites
    from .match.sites import ConvSpec, InputPlan, OutputPlan, RowSite
    from .rewrite.rewriter import rewrite_site
    from .weightmap import WeightEntry, WeightMap
    from .trace.traced import Traced
    from .trace.tracing import trace_model, traced

from .errors import (ConfigError, FxFuseError, InternalError, ResourceError, RewriteError,
                     TraceError, VerificationError)

__version__ = "0.1.0"

__all__ = [
    "fuse", "FuseResult", "FuseConfig", "apply_sites",
    "traced", "Traced", "trace_model", "find_row_sites", "rewrite_site", "choose_lowering",
    "extract_loop",
    "verify_models", "VerifyReport", "benchmark_models", "time_interleaved", "BenchResult",
    "Timing", "WeightMap", "WeightEntry", "RowSite", "ConvSpec", "InputPlan", "OutputPlan",
    "FxFuseError", "ConfigError", "TraceError", "RewriteError", "VerificationError",
    "InternalError", "ResourceError", "Choice", "choose_among",
    "export_onnx", "backend",
]

_LAZY = {
    **dict.fromkeys(("fuse", "FuseResult", "apply_sites"), "fxfuse.api"),
    **dict.fromkeys(("BenchResult", "Timing", "benchmark_models", "time_interleaved"),
                    "fxfuse.check.bench"),
    "FuseConfig": "fxfuse.config", "find_row_sites": "fxfuse.match.find",
    **dict.fromkeys(("Choice", "choose_among"), "fxfuse.check.decide"),
    **dict.fromkeys(("choose_lowering", "extract_loop"), "fxfuse.check.auto"),
    "rewrite_site": "fxfuse.rewrite.rewriter",
    **dict.fromkeys(("ConvSpec", "InputPlan", "OutputPlan", "RowSite"), "fxfuse.match.sites"),
    **dict.fromkeys(("traced", "trace_model"), "fxfuse.trace.tracing"),
    "Traced": "fxfuse.trace.traced",
    **dict.fromkeys(("VerifyReport", "verify_models"), "fxfuse.check.verify"),
    **dict.fromkeys(("WeightEntry", "WeightMap"), "fxfuse.weightmap"),
    "export_onnx": "fxfuse.deploy.onnx", "backend": "fxfuse.deploy.backend",
}


def __getattr__(name: str):
    """Every public name loads its module (and torch) on first use: ``import fxfuse`` and
    ``fxfuse --help`` stay fast and print nothing."""
    if name in _LAZY:
        from .running import quiet_import
        value = getattr(quiet_import(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxfuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
