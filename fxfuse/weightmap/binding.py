"""Validate a weight map's JSON, and bind a map to the checkpoint it was written with.

A bound map records a content hash of the fused tensors, the shape and dtype of every
fused tensor and every part, and a hash of its own entries. A checkpoint that does not
have those shapes and dtypes is refused, and so is a map whose entries were edited after
it was written; the content hash tells the very checkpoint written with the map from
fine-tuned weights of the same layout.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

from ..errors import ConfigError
from .entry import FORMAT, MAX_DIM, MAX_ENTRIES, OPS, WeightEntry


_FIX = "use the OUT.map.json that 'fxfuse fuse' wrote with this checkpoint"


def _bad(message: str) -> ConfigError:
    return ConfigError(f"not an fxfuse weight map: {message}; {_FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_parts(where: str, raw: dict) -> list[str]:
    """The entry's ``parts``: a non-empty list of non-empty key strings."""
    parts = raw.get("parts")
    if isinstance(parts, str) or not isinstance(parts, list):
        raise _bad(f"{where}: 'parts' is a {type(parts).__name__}, not a list of keys")
    if not parts:
        raise _bad(f"{where}: 'parts' is empty")
    if not all(isinstance(p, str) and p for p in parts):
        raise _bad(f"{where}: every part must be a non-empty key string")
    return parts


def _entry_layout(where: str, raw: dict) -> tuple[int, int | None, str]:
    """The entry's ``dim``, ``unsqueeze`` and ``op``, each checked against its range."""
    dim, unsqueeze, op = raw.get("dim", 0), raw.get("unsqueeze"), raw.get("op", "cat")
    if not _is_int(dim) or not -MAX_DIM <= dim < MAX_DIM:
        raise _bad(f"{where}: 'dim' is {dim!r}, not a dimension")
    if unsqueeze is not None and (not _is_int(unsqueeze) or not -MAX_DIM <= unsqueeze < MAX_DIM):
        raise _bad(f"{where}: 'unsqueeze' is {unsqueeze!r}, not a dimension or null")
    if op not in OPS:
        raise _bad(f"{where}: unknown op {op!r} (expected one of {', '.join(OPS)})")
    return dim, unsqueeze, op


def _entry_window(where: str, raw: dict, op: str, n_parts: int
                  ) -> tuple[tuple[int, int], ...] | None:
    """A ``pad`` entry's ``window``: one ``[offset, size]`` per part (a ``stack`` entry
    may have one too, with its ``pad_dim``; no other op has one)."""
    window = raw.get("window")
    if op not in ("pad", "stack") or op == "stack" and window is None:
        if window is not None:
            raise _bad(f"{where}: 'window' belongs only to 'pad' and 'stack' entries")
        return None
    if not _valid_windows(window, n_parts):
        raise _bad(f"{where}: a 'pad' entry needs 'window', one [offset, size] per part")
    return tuple(tuple(w) for w in window)


def _valid_windows(window: Any, n_parts: int) -> bool:
    return isinstance(window, list) and len(window) == n_parts and \
        all(isinstance(w, list) and len(w) == 2 and all(_is_int(v) for v in w)
            and w[0] >= 0 and w[1] > 0 for w in window)


def _entry(index: int, raw: Any) -> "WeightEntry":
    """Entry ``index`` of a map's JSON as a :class:`WeightEntry`, validated."""
    if not isinstance(raw, dict):
        raise _bad(f"entry {index} is a {type(raw).__name__}, not an object")
    key = raw.get("fused_key")
    where = f"entry {index} ({key!r})" if isinstance(key, str) else f"entry {index}"
    if not isinstance(key, str) or not key:
        raise _bad(f"{where} has no 'fused_key' string")
    parts = _entry_parts(where, raw)
    dim, unsqueeze, op = _entry_layout(where, raw)
    window = _entry_window(where, raw, op, len(parts))
    pad_dim = _entry_pad_dim(where, raw, op, window)
    if window is not None:
        return WeightEntry(key, tuple(parts), dim, unsqueeze, op, window, pad_dim)
    return WeightEntry(key, tuple(parts), dim, unsqueeze, op)


def _entry_pad_dim(where: str, raw: dict, op: str, window) -> int | None:
    """A padded ``stack`` entry's ``pad_dim``: the parts' dim that is padded."""
    pad_dim = raw.get("pad_dim")
    if op == "stack" and window is not None:
        if not _is_int(pad_dim) or not -MAX_DIM <= pad_dim < MAX_DIM:
            raise _bad(f"{where}: a padded 'stack' entry needs 'pad_dim', a dimension")
        return pad_dim
    if pad_dim is not None:
        raise _bad(f"{where}: 'pad_dim' belongs only to padded 'stack' entries")
    return None


def parse_map(data: Any) -> tuple[tuple["WeightEntry", ...], dict[str, Any] | None]:
    """The entries and binding of a map's parsed JSON, validated.

    Raises:
        ConfigError: one line naming the entry at fault.
    """
    if not isinstance(data, dict):
        raise _bad(f"the JSON is a {type(data).__name__}, not an object")
    if data.get("format") != FORMAT:
        raise _bad(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    raw = data.get("entries")
    if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
        raise _bad("'entries' is not a list of entries")
    entries = tuple(_entry(i, e) for i, e in enumerate(raw))
    seen: dict[str, str] = {}
    for e in entries:
        for key, role in ((e.fused_key, "fused key"), *((p, "part") for p in e.parts)):
            if key in seen:
                raise _bad(f"{key!r} is used twice (as a {seen[key]} and as a {role}); "
                           "a key belongs to exactly one entry")
            seen[key] = role
    binding = data.get("binding")
    if binding is not None and not _valid_binding(binding):
        raise _bad("its 'binding' is malformed")
    return entries, binding


def _valid_binding(binding: Any) -> bool:
    if not isinstance(binding, dict):
        return False
    if not all(isinstance(binding.get(k), str) for k in ("fused_sha256", "entries_sha256")):
        return False
    for table in ("fused", "parts"):
        rows = binding.get(table)
        if not isinstance(rows, dict):
            return False
        for row in rows.values():
            if not (isinstance(row, dict) and isinstance(row.get("dtype"), str)
                    and isinstance(row.get("shape"), list)
                    and all(_is_int(n) for n in row["shape"])):
                return False
    return True


def _entries_hash(wmap: "Any") -> str:
    text = json.dumps(wmap.entries_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _meta(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def fused_hash(wmap: "Any", state_dict: Mapping[str, Any]) -> str:
    """sha256 over the fused tensors (key, dtype, shape, bytes), in map order."""
    digest = hashlib.sha256()
    for e in wmap.entries:
        t = state_dict[e.fused_key].detach().cpu().contiguous()
        digest.update(json.dumps([e.fused_key, _meta(t)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def make_binding(wmap: "Any", fused: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The binding of ``wmap`` to the fused state_dict ``fused``."""
    missing = [e.fused_key for e in wmap.entries if e.fused_key not in fused]
    if missing:
        raise ConfigError(f"cannot bind the weight map: the fused model has no {missing[0]}")
    parts: dict[str, Any] = {}
    for e in wmap.entries:
        for key, part in zip(e.parts, e.split(fused[e.fused_key])):
            parts[key] = _meta(part)
    return {"fused_sha256": fused_hash(wmap, fused), "entries_sha256": _entries_hash(wmap),
            "fused": {e.fused_key: _meta(fused[e.fused_key]) for e in wmap.entries},
            "parts": parts}


def _check_layout(table: Mapping[str, Any], state_dict: Mapping[str, Any], what: str) -> None:
    for key, want in table.items():
        value = state_dict.get(key)
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"the weight map does not belong to this checkpoint: it has no "
                              f"tensor {key!r} (is it the {what} layout?); {_FIX}")
        got = _meta(value)
        if got != want:
            raise ConfigError(f"the weight map does not belong to this checkpoint: {key} is "
                              f"{got['dtype']} {tuple(got['shape'])} here, the map was written "
                              f"for {want['dtype']} {tuple(want['shape'])}; {_FIX}")


def _check_entries(wmap: "Any") -> None:
    if wmap.binding["entries_sha256"] != _entries_hash(wmap):
        raise ConfigError("the weight map was edited after 'fxfuse fuse' wrote it (its entries "
                          f"no longer match its binding); {_FIX}")


def check_fused(wmap: "Any", state_dict: Mapping[str, Any]) -> str:
    """See :meth:`Any.check_fused`."""
    if wmap.binding is None:
        for e in wmap.entries:
            if e.fused_key not in state_dict:
                raise ConfigError(f"the checkpoint lacks {e.fused_key}; is it the fused "
                                  f"model's? {_FIX}")
        return "layout"
    _check_entries(wmap)
    _check_layout(wmap.binding["fused"], state_dict, "fused")
    same = fused_hash(wmap, state_dict) == wmap.binding["fused_sha256"]
    return "exact" if same else "layout"


def check_original(wmap: "Any", state_dict: Mapping[str, Any]) -> None:
    """See :meth:`Any.check_original`."""
    if wmap.binding is None:
        return
    _check_entries(wmap)
    _check_layout(wmap.binding["parts"], state_dict, "original")
