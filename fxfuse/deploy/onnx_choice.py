"""The command line's ``-o OUT.onnx``: fuse, export and check each lowering, and with
``lowering="auto"`` keep the one ONNX Runtime runs fastest (or the original's export when
no fused export wins), written atomically."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..check.bench import time_interleaved, timing_of
from ..check.verify import Check
from ..io.writing import atomic_write
from .onnx import OnnxReport, _export, export_onnx, require_onnx
from .onnx_runtime import _bench, _check_in_runtime, _runners


def write_onnx(original: torch.nn.Module, out: Path, inputs: tuple[Any, ...], *,
               lowering: str = "auto", benchmark: bool = True, rounds: int = 15,
               **fuse_options: Any) -> tuple[Any, bool, OnnxReport]:
    """The command line's ``-o OUT.onnx``: fuse, export, check, time, write atomically.

    With ``lowering="auto"`` the choice is made where the file will run: the original
    and each lowering (``grouped``, ``grouped2d``) are exported, checked and timed in
    ONNX Runtime, interleaved, and a fused export is kept only when it wins by 5% in
    the median round and is not slower in the lower quartile; else the original's
    export is written. (The layouts PyTorch runs fastest are not always ONNX Runtime's:
    measured here, the channels-last grouped ``Conv2d`` ran 3x slower there.)

    Args:
        original: the model as loaded (not modified).
        out: the ``.onnx`` path (checked with :func:`check_onnx_output`).
        inputs: the example inputs.
        lowering: ``"auto"``, ``"grouped"`` or ``"grouped2d"``.
        benchmark: time in ONNX Runtime (always done for ``"auto"``).
        rounds: interleaved timing rounds.
        **fuse_options: passed to :func:`fxfuse.fuse` (``min_rows``, ``tracer``, ...).

    Returns:
        The :class:`~fxfuse.FuseResult` of the lowering written (for ``"auto"`` when the
        original was kept: of ``grouped``, for its report), whether the fused model was
        written, and the :class:`OnnxReport`.
    """
    from ..api import fuse
    require_onnx()
    if lowering != "auto":
        result = fuse(original, inputs, lowering=lowering, benchmark=False, **fuse_options)
        return result, True, export_onnx(result, out, inputs, original=original,
                                         benchmark=benchmark, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="fxfuse-onnx-") as tmp:
        built: dict[str, tuple[Any, Path, tuple[bool, int], list[Check]]] = {}
        first = None
        for name in ("grouped", "grouped2d"):
            result = fuse(original, inputs, lowering=name, benchmark=False, **fuse_options)
            first = first or result
            if result.changed:
                built[name] = _candidate(result, result.model, inputs, original, Path(tmp), name)
        built["original"] = _candidate(first, original, inputs, original, Path(tmp), "original")
        samples = time_interleaved(_runners({k: v[1] for k, v in built.items()}, inputs),
                                   rounds=rounds)
        chosen = _faster(samples)
        result, file, (dynamic, opset), checks = built[chosen]
        atomic_write(out, lambda dest: shutil.copyfile(file, dest))
    medians = ", ".join(f"{k} {timing_of(v).median_s * 1e3:.3g} ms" for k, v in samples.items())
    wrote = "the original (no fused export was faster)" if chosen == "original" else chosen
    notes = [f"ONNX Runtime medians: {medians}; wrote {wrote}"]
    if not dynamic:
        notes.append("exported with static shapes: the model did not allow a dynamic batch")
    timing = _bench(samples["original"], samples[chosen])
    return result, chosen != "original", OnnxReport(
        Path(out), opset, dynamic, "original", tuple(checks), timing, tuple(notes),
        holds="original" if chosen == "original" else "fused")


def _candidate(result: Any, model: torch.nn.Module, inputs: tuple[Any, ...],
               original: torch.nn.Module, tmp: Path,
               name: str) -> tuple[Any, Path, tuple[bool, int], list[Check]]:
    path = tmp / f"{name}.onnx"
    weight_map = getattr(result, "weight_map", None) if model is not original else None
    dynamic_opset = _export(model, inputs, path, weight_map)
    return result, path, dynamic_opset, _check_in_runtime(path, original, inputs,
                                                         dynamic_opset[0])


def _faster(samples: dict[str, list[float]]) -> str:
    """The fused export that beats the original by 5% in the median round and is not
    slower in the lower quartile, the fastest such; else ``"original"``."""
    best, best_ratio = "original", 1.0
    for name, times in samples.items():
        if name == "original":
            continue
        ratio = timing_of([a / b for a, b in zip(samples["original"], times)])
        if ratio.median_s >= 1.05 and ratio.q1_s >= 1.0 and ratio.median_s > best_ratio:
            best, best_ratio = name, ratio.median_s
    return best
