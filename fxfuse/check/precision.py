"""The precision a device runs float32/float16 work in, and what that mode permits.

On CUDA, cuDNN convolutions (``torch.backends.cudnn.allow_tf32``, on by default) and
matmuls (``torch.backends.cuda.matmul.allow_tf32``, ``torch.get_float32_matmul_precision()``)
may run float32 in TF32: inputs rounded to a 10-bit mantissa, products summed in float32.
Half-precision matmuls may reduce in half precision
(``allow_fp16/bf16_reduced_precision_reduction``). cuDNN picks per shape, so a loop of
small convs can run in full float32 while the one grouped conv that replaces it runs in
TF32. What the user's settings *allow* is then the bound, not what the loop happened to do.

:func:`emulate_tf32` re-runs any model with every float32 conv/matmul fed TF32-rounded
operands (on any device, CPU included): the error that model shows against float64 is
the error the mode permits it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TF32_UNIT_ROUNDOFF = 2.0 ** -11          # 10 explicit mantissa bits, round to nearest
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
                  torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


@dataclass(frozen=True)
class PrecisionMode:
    """Which reduced-precision shortcuts the device may take.

    Attributes:
        device: the device type the models run on (``"cuda"``, ``"cpu"``...).
        conv_tf32: float32 convolutions may run in TF32.
        matmul_tf32: float32 matmuls may run in TF32 (or lower, per
            ``float32_matmul_precision``).
        fp16_reduction: float16 matmuls may reduce in float16.
        bf16_reduction: bfloat16 matmuls may reduce in bfloat16.
    """

    device: str = "cpu"
    conv_tf32: bool = False
    matmul_tf32: bool = False
    fp16_reduction: bool = False
    bf16_reduction: bool = False

    def reduced_for(self, dtype: torch.dtype) -> str | None:
        """The reduced precision this mode allows for results of ``dtype`` (or None)."""
        if dtype == torch.float32 and (self.conv_tf32 or self.matmul_tf32):
            return "TF32"
        if dtype == torch.float16 and self.fp16_reduction:
            return "float16 reduced-precision reductions"
        if dtype == torch.bfloat16 and self.bf16_reduction:
            return "bfloat16 reduced-precision reductions"
        return None

    def unit_roundoff(self, dtype: torch.dtype) -> float:
        """The relative rounding of one product in this mode for ``dtype``."""
        if self.reduced_for(dtype) == "TF32":
            return TF32_UNIT_ROUNDOFF
        return _UNIT_ROUNDOFF.get(dtype, 2.0 ** -24)

    def describe(self) -> str:
        """One line for the report, e.g. ``cuda: TF32 allowed for convolutions``."""
        allowed = [label for flag, label in (
            (self.conv_tf32, "TF32 convolutions"), (self.matmul_tf32, "TF32 matmuls"),
            (self.fp16_reduction, "float16 reduced-precision reductions"),
            (self.bf16_reduction, "bfloat16 reduced-precision reductions")) if flag]
        return f"{self.device}: " + (", ".join(allowed) + " allowed" if allowed
                                     else "full precision")


def detect_precision(device: torch.device | str | None) -> PrecisionMode:
    """Read the current torch settings that apply to ``device``.

    Only CUDA takes these shortcuts; every other device reports full precision.
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind != "cuda":
        return PrecisionMode(kind)
    matmul = torch.backends.cuda.matmul
    return PrecisionMode(
        kind,
        conv_tf32=bool(torch.backends.cudnn.allow_tf32),
        matmul_tf32=bool(matmul.allow_tf32) or matmul_precision() not in ("highest", None),
        fp16_reduction=bool(getattr(matmul, "allow_fp16_reduced_precision_reduction", False)),
        bf16_reduction=bool(getattr(matmul, "allow_bf16_reduced_precision_reduction", False)))


def matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or ``None`` where torch refuses to say
    (newer torch raises when the legacy ``allow_tf32`` flags and the per-backend
    ``fp32_precision`` settings were both used; the legacy flags then tell)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Switch every reduced-precision shortcut off for the block (restored after)."""
    matmul = torch.backends.cuda.matmul
    precision = matmul_precision()
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32,
             matmul.allow_fp16_reduced_precision_reduction,
             matmul.allow_bf16_reduced_precision_reduction)
    try:
        if precision is not None:
            torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        matmul.allow_tf32 = False
        matmul.allow_fp16_reduced_precision_reduction = False
        matmul.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        if precision is not None:               # first: it also sets matmul.allow_tf32
            torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = saved[0]
        matmul.allow_tf32 = saved[1]
        matmul.allow_fp16_reduced_precision_reduction = saved[2]
        matmul.allow_bf16_reduced_precision_reduction = saved[3]


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32's 10-bit mantissa, to nearest; non-finite kept."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(t.isfinite(), rounded, t)


_CONV_OPS = {"convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution"}
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "dot", "mv", "addmv"}


class _TF32Emulation(TorchDispatchMode):
    """Feed every float32 conv/matmul the mode allows TF32-rounded operands."""

    def __init__(self, mode: PrecisionMode) -> None:
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (name in _CONV_OPS and self.mode.conv_tf32) or \
                (name in _MATMUL_OPS and self.mode.matmul_tf32):
            args = tuple(round_to_tf32(a) if isinstance(a, torch.Tensor)
                         and a.dtype == torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulate_tf32(mode: PrecisionMode | None = None) -> Iterator[None]:
    """Run the block as TF32 would (conv and matmul operands rounded), on any device.

    Args:
        mode: which op kinds to round; default both convolutions and matmuls.
    """
    mode = mode or PrecisionMode("cuda", conv_tf32=True, matmul_tf32=True)
    with full_precision(), _TF32Emulation(mode):
        yield
