"""fxfuse: rewrite per-row Conv1d loops into one grouped convolution, verified and timed.

    import fxfuse
    result = fxfuse.fuse(model, (x,))
    result.model          # a torch.fx.GraphModule with one conv per loop
    print(result.report())

The steps are public too: :func:`trace_model`, :func:`find_row_sites`,
:func:`rewrite_site`, :func:`verify_models`, :func:`benchmark_models`.

Deploying: :func:`export_onnx` (needs ``pip install "fxfuse[onnx]"``) and
:func:`backend`, the ``torch.compile`` backend (``backend="fxfuse"``); both are
imported on first use.
"""
from .api import FuseResult, apply_sites, fuse
from .check.bench import BenchResult, Timing, benchmark_models, time_interleaved
from .config import FuseConfig
from .errors import (ConfigError, FxFuseError, InternalError, RewriteError, TraceError,
                     VerificationError)
from .match.find import find_row_sites
from .check.auto import choose_lowering, extract_loop
from .check.decide import Choice, choose_among
from .rewrite.rewriter import rewrite_site
from .match.sites import ConvSpec, InputPlan, OutputPlan, RowSite
from .trace.tracing import trace_model
from .check.verify import VerifyReport, verify_models
from .rewrite.weights import WeightEntry, WeightMap

__version__ = "0.1.0"

__all__ = [
    "fuse", "FuseResult", "FuseConfig", "apply_sites",
    "trace_model", "find_row_sites", "rewrite_site", "choose_lowering", "extract_loop",
    "verify_models", "VerifyReport", "benchmark_models", "time_interleaved", "BenchResult",
    "Timing", "WeightMap", "WeightEntry", "RowSite", "ConvSpec", "InputPlan", "OutputPlan",
    "FxFuseError", "ConfigError", "TraceError", "RewriteError", "VerificationError",
    "InternalError", "Choice", "choose_among",
    "export_onnx", "backend",
]

_LAZY = {"export_onnx": ("fxfuse.deploy.onnx", "export_onnx"),
         "backend": ("fxfuse.deploy.backend", "backend")}


def __getattr__(name: str):
    """``export_onnx`` and ``backend`` load their modules (ONNX, Dynamo) on first use."""
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxfuse' has no attribute {name!r}")
