"""Write a fused model as an ONNX file, checked in ONNX Runtime against the original.

``torch.onnx.export(..., dynamo=True)`` with the batch dim dynamic (static shapes when
the model does not allow it), ``onnx.checker``, then ONNX Runtime runs the file on the
example inputs and on another batch size and is compared with the PyTorch model, with
the same per-dtype tolerances as verification. Optionally the original model is
exported too and both files are timed in ONNX Runtime, interleaved.

The file is written to a temporary name next to ``path`` and moved into place only
after every check passed; on any failure nothing is left. Needs the ``onnx`` extra
(``pip install "fxfuse[onnx]"``); ``import fxfuse`` does not.

ONNX Runtime's side (sessions, the comparison, timing runners) is in
:mod:`.onnx_runtime`; the command line's ``-o OUT.onnx`` with its ``auto`` choice among
the exported lowerings is in :mod:`.onnx_choice`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import fx

from ..check.bench import BenchResult, time_interleaved
from ..check.verify import Check
from ..errors import ConfigError, TraceError, one_line
from ..io.writing import atomic_write
from ..trace.export import batch_dynamic_shapes
from .onnx_runtime import _bench, _check_in_runtime, _runners  # noqa: F401 - _runners: benchmarks

log = logging.getLogger("fxfuse")

ONNX_SUFFIX = ".onnx"
MAP_KEY = "fxfuse_weight_map"
_NEEDED = ("onnx", "onnxscript", "onnxruntime")


class MissingExtraError(ConfigError):
    """An optional dependency group is not installed."""


@dataclass(frozen=True)
class OnnxReport:
    """What :func:`export_onnx` wrote and checked.

    Attributes:
        path: the ONNX file.
        opset: its default-domain opset version.
        dynamic_batch: True when dim 0 of every input is symbolic in the file.
        reference: what ONNX Runtime's outputs were compared with (``"original"``, the
            original PyTorch model, or ``"fused"``, the fused PyTorch model).
        checks: one :class:`~fxfuse.check.verify.Check` per batch size compared.
        timing: ONNX Runtime time of the original model's export vs the fused one's
            (``None`` when not timed).
        notes: what was skipped, and why.
        holds: what the file computes with: ``"fused"``, or ``"original"`` when the
            original model's export was written (no fused export ran faster).
    """

    path: Path
    opset: int
    dynamic_batch: bool
    reference: str
    checks: tuple[Check, ...]
    timing: BenchResult | None
    notes: tuple[str, ...] = ()
    holds: str = "fused"

    def summary(self) -> str:
        """A few lines for a terminal."""
        batch = "any batch size" if self.dynamic_batch else "the traced shapes only"
        lines = [f"ONNX opset {self.opset}, runs with {batch}"]
        if self.holds == "original":
            lines[0] += ("; the file holds the original model, not fused (no fused export "
                         "ran faster in ONNX Runtime)")
        for c in self.checks:
            lines.append(f"ONNX Runtime vs {self.reference} PyTorch model, {c.name}: max abs "
                         f"error {c.max_abs:.3g}, max rel {c.max_rel:.3g}")
        t = self.timing
        if t is not None:
            lines.append(f"ONNX Runtime: original {t.original.median_s * 1e3:.3g} ms "
                         f"(IQR {t.original.q1_s * 1e3:.3g}-{t.original.q3_s * 1e3:.3g}), fused "
                         f"{t.fused.median_s * 1e3:.3g} ms (IQR {t.fused.q1_s * 1e3:.3g}-"
                         f"{t.fused.q3_s * 1e3:.3g}): {t.speedup:.2f}x (IQR "
                         f"{t.speedup_q1:.2f}-{t.speedup_q3:.2f}x, {t.original.rounds} rounds)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


def require_onnx() -> None:
    """Raise :class:`MissingExtraError` (one line: what to install) unless the ONNX
    dependencies are importable."""
    missing = []
    for name in _NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"writing .onnx needs {', '.join(missing)}: "
                                'pip install "fxfuse[onnx]"')


def is_onnx_path(path: str | Path) -> bool:
    """True when ``path`` names an ONNX file."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def check_onnx_output(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an ``.onnx`` output that is an input file or cannot be written, and a
    missing ONNX extra; before any work is done.

    Raises:
        ConfigError: one line naming the problem and the fix.
    """
    out = Path(out).expanduser()
    if not is_onnx_path(out):
        raise ConfigError(f"{str(out)!r} does not end in .onnx")
    for source in inputs:
        if _same_file(out, Path(source)):
            raise ConfigError(f"output {str(out)!r} is the input file {str(source)!r}; fxfuse "
                              "never overwrites its input, choose another output name")
    parent = out.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {str(out)!r}: directory {str(parent)!r} is missing "
                          "or not writable")
    if out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a directory; give a file name")
    require_onnx()
    return out


def _same_file(a: Path, b: Path) -> bool:
    from ..io.writing import resolved
    if resolved(a) == resolved(b, "input"):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def export_onnx(result: Any, path: str | Path, example_inputs: Sequence[Any] | None = None,
                *, original: torch.nn.Module | None = None, benchmark: bool = True,
                rounds: int = 15) -> OnnxReport:
    """Export a fused model to ONNX, check it in ONNX Runtime, write it atomically.

    Args:
        result: a :class:`~fxfuse.FuseResult` (its ``model`` is exported) or a module.
        path: the ``.onnx`` file to write (replaced whole, or left as it was).
        example_inputs: positional inputs; default: random tensors of the shapes and
            dtypes the fused graph was traced with.
        original: the original PyTorch model. ONNX Runtime's outputs are compared with
            it (else with the fused PyTorch model), and its own export is timed against
            the fused one's.
        benchmark: time both exports in ONNX Runtime (needs ``original``).
        rounds: interleaved timing rounds.

    Returns:
        An :class:`OnnxReport`.

    Raises:
        MissingExtraError: ``onnx``/``onnxscript``/``onnxruntime`` are not installed.
        TraceError: the model could not be exported.
        VerificationError: ONNX Runtime's outputs differ; no file is written.
    """
    require_onnx()
    model = getattr(result, "model", result)
    path = check_onnx_output(path)
    inputs = tuple(example_inputs) if example_inputs is not None else _inputs_of(model)
    reference = original if original is not None else model
    weight_map = getattr(result, "weight_map", None)
    found: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        found["dynamic"], found["opset"] = _export(model, inputs, tmp, weight_map)
        found["checks"] = _check_in_runtime(tmp, reference, inputs, found["dynamic"])

    atomic_write(path, write)
    notes: list[str] = []
    timing = None
    if benchmark and original is None:
        notes.append("not timed: pass original= to time its export against the fused one")
    elif benchmark:
        timing = _time_exports(original, path, inputs, rounds, notes)
    if not found["dynamic"]:
        notes.append("exported with static shapes: the model did not allow a dynamic batch")
    return OnnxReport(path, found["opset"], found["dynamic"],
                      "original" if original is not None else "fused",
                      tuple(found["checks"]), timing, tuple(notes))


def _inputs_of(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Random inputs with the shapes/dtypes recorded on the graph's placeholders."""
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("give example_inputs: the model is not a traced GraphModule")
    gen = torch.Generator().manual_seed(0)
    out = []
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ConfigError(f"give example_inputs: input {node.name!r} has no recorded shape")
        out.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
    return tuple(out)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress and registry warnings; keep them out of the way."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _program(model: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, bool]:
    """The ONNX program, batch dim dynamic where the model allows it."""
    with _quiet():
        try:
            return torch.onnx.export(model, inputs, dynamo=True, verbose=False,
                                     dynamic_shapes=batch_dynamic_shapes(model, inputs)), True
        except Exception as exc:  # noqa: BLE001 - a dynamic batch is a bonus; fall back
            log.info("ONNX export with a dynamic batch failed (%s); exporting static shapes",
                     one_line(exc))
        try:
            return torch.onnx.export(model, inputs, dynamo=True, verbose=False), False
        except Exception as exc:  # noqa: BLE001
            raise TraceError(f"torch.onnx.export could not export the model "
                             f"({one_line(exc)}); write .pt2 instead") from exc


def _export(model: torch.nn.Module, inputs: tuple[Any, ...], tmp: Path,
            weight_map: Any) -> tuple[bool, int]:
    """Export to ``tmp`` and run ``onnx.checker`` on it; returns (dynamic batch, opset)."""
    import onnx
    program, dynamic = _program(model, inputs)
    proto = program.model_proto
    if weight_map is not None and getattr(weight_map, "entries", ()):
        proto.metadata_props.add(key=MAP_KEY, value=weight_map.to_json())
    onnx.save(proto, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker has several error types
        raise TraceError(f"the exported ONNX model fails onnx.checker ({one_line(exc)})") \
            from exc
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return dynamic, int(opset)


def _time_exports(original: torch.nn.Module, fused_path: Path, inputs: tuple[Any, ...],
                  rounds: int, notes: list[str]) -> BenchResult | None:
    """ONNX Runtime time of the original model's export vs the fused file, interleaved."""
    with tempfile.TemporaryDirectory(prefix="fxfuse-onnx-") as tmp:
        original_path = Path(tmp) / "original.onnx"
        try:
            _export(original, inputs, original_path, None)
        except Exception as exc:  # noqa: BLE001 - timing is a bonus; say why it is missing
            notes.append(f"not timed: the original model could not be exported "
                         f"({one_line(exc)})")
            return None
        samples = time_interleaved(
            _runners({"original": original_path, "fused": fused_path}, inputs), rounds=rounds)
    return _bench(samples["original"], samples["fused"])


