"""ONNX Runtime's side of the ONNX export: sessions on the CPU provider, feeds from torch
tensors, the comparison with the PyTorch model (at the example batch and one more) and
interleaved runners for timing exported files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..check.bench import BenchResult, timing_of
from ..check.verify import Check, compare
from ..errors import ConfigError


def _session(path: Path) -> Any:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, inputs: Sequence[Any]) -> dict[str, Any]:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ConfigError(f"the ONNX model takes {len(names)} inputs, the example has "
                          f"{len(tensors)} tensors; give one tensor per model input")
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise ConfigError("ONNX Runtime's Python API cannot take bfloat16 inputs; export a "
                          "float32 or float16 model")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}


def _other_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Fresh random inputs with the batch dim one larger (None without a batched input)."""
    gen = torch.Generator().manual_seed(1)
    if not any(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        return None
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.is_floating_point():
            out.append(torch.randn((x.shape[0] + 1, *x.shape[1:]), generator=gen).to(x))
        elif isinstance(x, torch.Tensor) and x.dim() > 0:
            out.append(torch.cat([x, x[:1]]))
        else:
            out.append(x)
    return tuple(out)


def _check_in_runtime(path: Path, reference: torch.nn.Module, inputs: tuple[Any, ...],
                      dynamic: bool) -> list[Check]:
    """Run ``path`` in ONNX Runtime and compare with ``reference`` (per-dtype tolerances).

    Raises:
        VerificationError: ONNX Runtime's outputs differ.
    """
    session = _session(path)
    cases = [("example inputs", inputs)]
    other = _other_batch(inputs) if dynamic else None
    if other is not None:
        cases.append((f"batch {other[0].shape[0] if isinstance(other[0], torch.Tensor) else ''}"
                      .strip(), other))
    checks = []
    for name, case in cases:
        with torch.no_grad():
            want = reference(*case)
        got = session.run(None, _feeds(session, case))
        checks.append(compare(f"ONNX Runtime, {name}", want,
                              [torch.from_numpy(g) for g in got]))
    return checks


def _runners(paths: dict[str, Path], inputs: tuple[Any, ...]) -> dict[str, Any]:
    sessions = {k: _session(p) for k, p in paths.items()}
    feeds = {k: _feeds(s, inputs) for k, s in sessions.items()}
    return {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}


def _bench(original: Sequence[float], fused: Sequence[float]) -> BenchResult:
    ratio = timing_of([a / b for a, b in zip(original, fused)])
    return BenchResult(timing_of(original), timing_of(fused), ratio.median_s, ratio.q1_s,
                       ratio.q3_s)
