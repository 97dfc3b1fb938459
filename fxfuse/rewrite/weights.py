"""The map between a looped model's state_dict and the fused model's, both ways, exactly.

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
    sizes padded to the largest; splitting slices the windows back out).
    """

    fused_key: str
    parts: tuple[str, ...]
    dim: int = 0
    unsqueeze: int | None = None
    op: str = "cat"
    window: tuple[tuple[int, int], ...] | None = None

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
            fused = torch.stack(tensors, dim=self.dim)
        elif self.op == "pad":
            fused = torch.cat(self._padded(tensors), dim=self.dim)
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
            return [t.clone() for t in torch.unbind(fused, dim=self.dim)]
        size, rem = divmod(fused.shape[self.dim], len(self.parts))
        if rem:
            raise ConfigError(f"{self.fused_key} has {fused.shape[self.dim]} entries on dim "
                              f"{self.dim}, not a multiple of {len(self.parts)} rows")
        parts = torch.split(fused, size, dim=self.dim)
        if self.op == "pad":
            if fused.shape[-1] != self._width():
                raise ConfigError(f"{self.fused_key} has {fused.shape[-1]} entries on its last "
                                  f"dim, the map says {self._width()}")
            return [t[..., o:o + k].clone() for t, (o, k) in zip(parts, self._windows())]
        return [t.clone() for t in parts]

    def _windows(self) -> tuple[tuple[int, int], ...]:
        if not self.window or len(self.window) != len(self.parts):
            raise ConfigError(f"{self.fused_key}: a 'pad' entry needs one (offset, size) "
                              "window per part")
        return self.window

    def _width(self) -> int:
        return max(o + k for o, k in self._windows())

    def _padded(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        width, out = self._width(), []
        for t, (o, k) in zip(tensors, self._windows()):
            if t.shape[-1] != k:
                raise ValueError(f"a part has {t.shape[-1]} entries on its last dim, not {k}")
            out.append(torch.nn.functional.pad(t, (o, width - o - k)))
        return out


@dataclass(frozen=True)
class WeightMap:
    """Which fused tensor holds which original tensors, in which order, along which dim."""

    entries: tuple[WeightEntry, ...] = ()
    binding: Mapping[str, Any] | None = None

    def __add__(self, other: "WeightMap") -> "WeightMap":
        return WeightMap(self.entries + other.entries)

    def bind(self, fused_state_dict: Mapping[str, torch.Tensor]) -> "WeightMap":
        """This map, bound to the fused checkpoint it was written with.

        The binding records a content hash of the fused tensors, each fused tensor's and
        each part's shape and dtype, and a hash of the entries; :meth:`check_fused` and
        :meth:`check_original` use it to refuse a checkpoint the map does not belong to.
        """
        from .weights_binding import make_binding
        return WeightMap(self.entries, make_binding(self, fused_state_dict))

    def check_fused(self, state_dict: Mapping[str, Any]) -> str:
        """Refuse (ConfigError) a fused-layout checkpoint this map was not made for.

        Returns:
            ``"exact"`` when the tensors are the very ones the map was written with,
            ``"layout"`` when only shapes and dtypes match (fine-tuned weights, say).
        """
        from .weights_binding import check_fused
        return check_fused(self, state_dict)

    def check_original(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse (ConfigError) an original-layout checkpoint whose parts do not match."""
        from .weights_binding import check_original
        check_original(self, state_dict)

    def to_fused(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert an original-layout state_dict to the fused layout.

        Raises:
            ConfigError: a key the map needs is missing.
        """
        out = dict(state_dict)
        for e in self.entries:
            missing = [k for k in e.parts if k not in out]
            if missing:
                raise ConfigError(f"state_dict lacks {missing[0]} (needed for {e.fused_key}); "
                                  "is it the original model's state_dict?")
            out[e.fused_key] = e.join([out.pop(k) for k in e.parts])
        return out

    def to_original(self, state_dict: Mapping[str, torch.Tensor], *,
                    strict: bool = True) -> dict[str, torch.Tensor]:
        """Convert a fused-layout state_dict (or gradients keyed alike) back to the original.

        With ``strict=False`` fused keys absent from ``state_dict`` are skipped.

        Raises:
            ConfigError: a fused key is missing or its size does not split evenly.
        """
        out = dict(state_dict)
        for e in reversed(self.entries):
            if e.fused_key not in out:
                if not strict:
                    continue
                raise ConfigError(f"state_dict lacks {e.fused_key}; is it the fused model's?")
            for key, part in zip(e.parts, e.split(out.pop(e.fused_key))):
                out[key] = part
        return out

    def entries_json(self) -> list[dict[str, Any]]:
        """The entries as JSON-ready dicts."""
        out = []
        for e in self.entries:
            raw = dict(asdict(e), parts=list(e.parts))
            if e.window is None:
                del raw["window"]
            else:
                raw["window"] = [list(w) for w in e.window]
            out.append(raw)
        return out

    def to_json(self) -> str:
        """The map as JSON text (see :meth:`from_json`)."""
        data: dict[str, Any] = {"format": FORMAT, "entries": self.entries_json()}
        if self.binding is not None:
            data["binding"] = dict(self.binding)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "WeightMap":
        """Read and validate a map written by :meth:`to_json`.

        Raises:
            ConfigError: the text is not such a map (one line naming the entry at fault).
        """
        from .weights_binding import parse_map
        try:
            data = json.loads(text)
        except RecursionError:
            raise ConfigError("not an fxfuse weight map: its JSON is nested too deeply") from None
        except ValueError as exc:
            raise ConfigError(f"not an fxfuse weight map: not JSON ({exc})") from exc
        entries, binding = parse_map(data)
        return cls(entries, binding)

    def save(self, path: str | Path) -> None:
        """Write the map as JSON to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "WeightMap":
        """Read a map saved with :meth:`save`."""
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read weight map {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not an fxfuse weight map (not JSON text)") from exc
