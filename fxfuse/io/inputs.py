"""What the command line turns into values before any model code runs: the floating
dtype, the device, random example inputs from ``--input-shape`` and the factory's
``--model-kwargs``. Every failure is a one-line :class:`~fxfuse.errors.ConfigError`."""
from __future__ import annotations

import json
from typing import Any

import torch

from ..errors import ConfigError
from .checkpoints import first_line

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A floating dtype from its name (``float32``/``fp32``, ``float16``/``half``,
    ``bfloat16``/``bf16``, ``float64``); None means float32.

    Raises:
        ConfigError: the name is not one of those.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ConfigError(f"dtype {name} is not a floating type; use float32, float16 or bfloat16")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use float32 (fp32), float16 (half), "
                          "bfloat16 (bf16) or float64")
    return _DTYPES[key]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r} ({first_line(exc)}); use cpu, cuda "
                          "or cuda:N") from exc
    if dev.type == "meta":
        raise ConfigError("--device meta holds no data, so nothing can be verified or timed; "
                          "use cpu, cuda or cuda:N")
    return dev


def parse_input_shapes(shapes: list[str], dtype: str | torch.dtype | None = None,
                       device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """One random tensor per ``--input-shape`` (``"32,15,10,100"`` or ``"32x15x10x100"``).

    Values come from ``torch.randn`` with a ``torch.Generator`` seeded 0 (drawn in
    float32 on the CPU, then cast and moved), so every run sees the same inputs.

    Returns:
        The tensors, in the order given.

    Raises:
        ConfigError: no shape, a non-integer or non-positive size, or a bad dtype/device.
    """
    if not shapes:
        raise ConfigError("no --input-shape given; pass one per model input, e.g. "
                          "--input-shape 32,15,10,100")
    dt, dev = parse_dtype(dtype), _parse_device(device)
    gen = torch.Generator().manual_seed(0)
    out = []
    for text in shapes:
        size = _parse_shape(text)
        try:
            out.append(torch.randn(size, generator=gen).to(device=dev, dtype=dt))
        except (RuntimeError, AssertionError, TypeError, OverflowError, MemoryError) as exc:
            raise ConfigError(f"cannot make an input of shape {text!r} on {dev} ({first_line(exc)}); "
                              "choose an available --device") from exc
    return tuple(out)


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"bad --input-shape {text!r}; write whole sizes separated by ',' "
                          "or 'x', e.g. 32,15,10,100") from None
    if any(s <= 0 for s in size):
        raise ConfigError(f"bad --input-shape {text!r}: every size must be at least 1")
    total = 1
    for s in size:
        total *= s
    if total >= 2 ** 63:
        raise ConfigError(f"bad --input-shape {text!r}: {total} elements is beyond int64; "
                          "give the sizes of one real input")
    return size


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """The factory's keyword arguments from ``--model-kwargs`` JSON ({} when not given).

    Raises:
        ConfigError: not JSON, or not a JSON object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--model-kwargs is not valid JSON ({exc}); write an object, e.g. "
                          "'{\"rows\": 8, \"channels\": 16}'") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object of keyword arguments, got "
                          f"{type(value).__name__}; e.g. '{{\"rows\": 8}}'")
    return value
