"""One entry of the map between a looped model's state_dict and the fused model's, both ways, exactly.

Each fused tensor is the concatenation of some original tensors along one dim
(optionally with a size-1 dim inserted, for the Conv2d lowering). Converting is only
``cat`` / ``split`` / ``unsqueeze`` / ``squeeze``: a round trip is bit-for-bit.

Example::

    wm = result.weight_map
    fused_sd = wm.to_fused(original_model.state_dict())     # load into result.model
    original_sd = wm.to_original(result.model.state_dict()) # load into the user's class
    wm.save("model.map.json"); wm = WeightMap.load("model.map.json")
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ConfigError

FORMAT = "fxfuse-weight-map/1"
OPS = ("cat", "stack", "same", "pad")
MAX_ENTRIES = 1_000_000
MAX_DIM = 64


@dataclass(frozen=True)
class WeightEntry:
    """``fused_key`` holds ``parts`` joined along ``dim`` (then ``unsqueeze`` applied).

    ``op`` is ``"cat"`` (concatenated), ``"stack"`` (stacked on a new dim) or
    ``"same"`` (every part holds the same value, e.g. BatchNorm's batch counter) or
    ``"pad"`` (concatenated after zero-padding each part's last dim: part ``i`` sits at
    ``window[i] = (offset, size)`` of the fused last dim, e.g. conv kernels of different
    sizes padded to the largest; splitting slices the windows back out). A ``"stack"``
    entry with a ``window`` stacks parts that differ in size along their dim
    ``pad_dim``, each zero-padded there to the largest (rows of different sizes fused
    into one loop); splitting slices each part's window back out.
    """

    fused_key: str
    parts: tuple[str, ...]
    dim: int = 0
    unsqueeze: int | None = None
    op: str = "cat"
    window: tuple[tuple[int, int], ...] | None = None
    pad_dim: int | None = None

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The fused tensor made from the parts' tensors.

        Raises:
            ConfigError: the parts cannot be joined that way (ranks, shapes, dim).
        """
        try:
            return self._join(tensors)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise ConfigError(f"{self.fused_key}: cannot {self.op} its {len(self.parts)} parts "
                              f"on dim {self.dim} ({str(exc).splitlines()[0][:120]}); the map "
                              "does not fit this checkpoint") from exc

    def _join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "same":
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ConfigError(f"{self.fused_key}: {self.parts[0]} and the other parts differ; "
                                  "they must be equal to share one fused tensor")
            fused = tensors[0].clone()
        elif self.op == "stack":
            padded = self._padded(tensors, self.pad_dim) if self.window else tensors
            fused = torch.stack(padded, dim=self.dim)
        elif self.op == "pad":
            fused = torch.cat(self._padded(tensors, -1), dim=self.dim)
        else:
            fused = torch.cat(tensors, dim=self.dim)
        return fused if self.unsqueeze is None else fused.unsqueeze(self.unsqueeze)

    def split(self, fused: torch.Tensor) -> list[torch.Tensor]:
        """The parts' tensors recovered from the fused tensor (exact).

        Raises:
            ConfigError: the fused tensor cannot be split that way.
        """
        try:
            parts = self._split(fused)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise ConfigError(f"{self.fused_key} {tuple(fused.shape)} cannot be split on dim "
                              f"{self.dim} ({str(exc).splitlines()[0][:120]}); the map does "
                              "not fit this checkpoint") from exc
        if len(parts) != len(self.parts):
            raise ConfigError(f"{self.fused_key} splits into {len(parts)} rows on dim "
                              f"{self.dim}, but the map lists {len(self.parts)} parts; the map "
                              "does not fit this checkpoint")
        return parts

    def _split(self, fused: torch.Tensor) -> list[torch.Tensor]:
        if self.unsqueeze is not None:
            fused = fused.squeeze(self.unsqueeze)
        if self.op == "same":
            return [fused.clone() for _ in self.parts]
        if self.op == "stack":
            rows = torch.unbind(fused, dim=self.dim)
            if self.window:
                return self._windowed(rows, self.pad_dim)
            return [t.clone() for t in rows]
        size, rem = divmod(fused.shape[self.dim], len(self.parts))
        if rem:
            raise ConfigError(f"{self.fused_key} has {fused.shape[self.dim]} entries on dim "
                              f"{self.dim}, not a multiple of {len(self.parts)} rows")
        parts = torch.split(fused, size, dim=self.dim)
        if self.op == "pad":
            return self._windowed(parts, -1)
        return [t.clone() for t in parts]

    def _windowed(self, parts, dim: int) -> list[torch.Tensor]:
        """Each part's window along ``dim`` (the padding sliced off)."""
        if parts and parts[0].shape[dim] != self._width():
            raise ConfigError(f"{self.fused_key} has {parts[0].shape[dim]} entries on its "
                              f"padded dim, the map says {self._width()}")
        return [t.narrow(dim, o, k).clone() for t, (o, k) in zip(parts, self._windows())]

    def _windows(self) -> tuple[tuple[int, int], ...]:
        if not self.window or len(self.window) != len(self.parts):
            raise ConfigError(f"{self.fused_key}: a 'pad' entry needs one (offset, size) "
                              "window per part")
        return self.window

    def _width(self) -> int:
        return max(o + k for o, k in self._windows())

    def _padded(self, tensors: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
        """Each part zero-padded along ``dim`` to sit at its window."""
        width, out = self._width(), []
        for t, (o, k) in zip(tensors, self._windows()):
            if t.shape[dim] != k:
                raise ValueError(f"a part has {t.shape[dim]} entries on its padded dim, not {k}")
            before = list(t.shape)
            after = list(t.shape)
            before[dim], after[dim] = o, width - o - k
            out.append(torch.cat([t.new_zeros(before), t, t.new_zeros(after)], dim))
        return out
