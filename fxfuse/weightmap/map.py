"""The map between a looped model's state_dict and the fused model's, both ways, exactly.

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
from .binding import check_fused, check_original, make_binding, parse_map
from .entry import FORMAT, WeightEntry


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
        return WeightMap(self.entries, make_binding(self, fused_state_dict))

    def check_fused(self, state_dict: Mapping[str, Any]) -> str:
        """Refuse (ConfigError) a fused-layout checkpoint this map was not made for.

        Returns:
            ``"exact"`` when the tensors are the very ones the map was written with,
            ``"layout"`` when only shapes and dtypes match (fine-tuned weights, say).
        """
        return check_fused(self, state_dict)

    def check_original(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse (ConfigError) an original-layout checkpoint whose parts do not match."""
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
            if e.pad_dim is None:
                del raw["pad_dim"]
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
