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
from typing import Mapping

import torch

from .errors import ConfigError

FORMAT = "fxfuse-weight-map/1"


@dataclass(frozen=True)
class WeightEntry:
    """``fused_key`` holds ``parts`` concatenated along ``dim`` (then ``unsqueeze`` applied)."""

    fused_key: str
    parts: tuple[str, ...]
    dim: int = 0
    unsqueeze: int | None = None


@dataclass(frozen=True)
class WeightMap:
    """Which fused tensor holds which original tensors, in which order, along which dim."""

    entries: tuple[WeightEntry, ...] = ()

    def __add__(self, other: "WeightMap") -> "WeightMap":
        return WeightMap(self.entries + other.entries)

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
            fused = torch.cat([out.pop(k) for k in e.parts], dim=e.dim)
            out[e.fused_key] = fused if e.unsqueeze is None else fused.unsqueeze(e.unsqueeze)
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
            fused = out.pop(e.fused_key)
            if e.unsqueeze is not None:
                fused = fused.squeeze(e.unsqueeze)
            size, rem = divmod(fused.shape[e.dim], len(e.parts))
            if rem:
                raise ConfigError(f"{e.fused_key} has {fused.shape[e.dim]} entries on dim "
                                  f"{e.dim}, not a multiple of {len(e.parts)} rows")
            for key, part in zip(e.parts, torch.split(fused, size, dim=e.dim)):
                out[key] = part.clone()
        return out

    def to_json(self) -> str:
        """The map as JSON text (see :meth:`from_json`)."""
        return json.dumps({"format": FORMAT, "entries": [asdict(e) for e in self.entries]},
                          indent=2)

    @classmethod
    def from_json(cls, text: str) -> "WeightMap":
        """Read a map written by :meth:`to_json`.

        Raises:
            ConfigError: the text is not such a map.
        """
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            return cls(tuple(WeightEntry(e["fused_key"], tuple(e["parts"]), int(e["dim"]),
                                         e.get("unsqueeze")) for e in data["entries"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"not an fxfuse weight map: {exc}") from exc

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
