"""Weights from a ``save_pretrained``-style directory: ``config.json`` beside
``model.safetensors`` or ``pytorch_model.bin``, or their shards listed in
``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError

SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _shards(directory: Path, index: Path) -> list[Path]:
    """The shard files ``index`` lists (its ``weight_map`` values), in order, each inside
    ``directory``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"weights index {str(index)!r} is not a save_pretrained index "
                          f"(a JSON object with a \"weight_map\" of key -> shard file: {exc!r}); "
                          "re-save the model with save_pretrained") from exc
    shards = []
    for name in names:
        shard = (directory / str(name)).resolve()
        if shard.parent != directory.resolve() or not shard.is_file():
            raise ConfigError(f"weights index {str(index)!r} names shard {name!r}, which is "
                              f"not a file in {str(directory)!r}; copy every shard beside it")
        shards.append(shard)
    return shards


def _files(directory: Path) -> list[Path]:
    for name in SINGLE:
        if (directory / name).is_file():
            return [directory / name]
    for name in INDEXES:
        if (directory / name).is_file():
            return _shards(directory, directory / name)
    raise ConfigError(f"weights directory {str(directory)!r} holds none of "
                      f"{', '.join(SINGLE + INDEXES)}; give a save_pretrained directory or "
                      "the weights file itself")


def read_pretrained(directory: Path, read: Callable[[Path], Mapping[str, Any]]
                    ) -> Mapping[str, Any]:
    """The state_dict of a ``save_pretrained`` directory, shards merged (each read with
    ``read``, the loader of a single weights file).

    Raises:
        ConfigError: no weights file there, a broken index, a missing shard, or a key
            stored in two shards.
    """
    merged: dict[str, Any] = {}
    for path in _files(directory):
        part = read(path)
        twice = sorted(set(part) & set(merged))
        if twice:
            raise ConfigError(f"weights {twice[0]!r} is stored in two shards of "
                              f"{str(directory)!r} (also in {path.name}); re-save the model")
        merged.update(part)
    return merged
