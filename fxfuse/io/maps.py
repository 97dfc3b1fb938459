"""Where a weight map rides along with the weights it describes, and reading it back.

A ``.safetensors`` header is limited to 100 MB (the map and the tensor index together),
so a map larger than :data:`PLAIN_LIMIT` is stored zlib-compressed and base64-encoded
under :data:`PACKED_NAME` (maps are repetitive JSON: 110 MB packs into a few MB); a map
too large even then is not embedded, and the ``OUT.map.json`` sidecar is the only copy.
A ``.pt2`` holds the map verbatim as the extra file ``extra/fxfuse_weight_map.json``.
"""
from __future__ import annotations

import base64
import binascii
import zipfile
import zlib
from pathlib import Path

from ..errors import ConfigError

MAP_NAME = "fxfuse_weight_map.json"
PACKED_NAME = MAP_NAME + ".zlib.b64"
PLAIN_LIMIT = 32 << 20              # bytes of map text stored as it is
PACKED_LIMIT = 64 << 20             # bytes of packed map stored at all
MAX_MAP = 2 << 30                   # a map larger than this is refused when read


def map_metadata(text: str) -> dict[str, str]:
    """The ``.safetensors`` metadata that carries the map ``text`` ({} when too large)."""
    data = text.encode("utf-8")
    if len(data) <= PLAIN_LIMIT:
        return {MAP_NAME: text}
    packed = base64.b64encode(zlib.compress(data, 6)).decode("ascii")
    return {PACKED_NAME: packed} if len(packed) <= PACKED_LIMIT else {}


def map_from_metadata(metadata: dict[str, str] | None) -> str | None:
    """The map text stored by :func:`map_metadata`, or None when there is none."""
    metadata = metadata or {}
    if MAP_NAME in metadata:
        return metadata[MAP_NAME]
    packed = metadata.get(PACKED_NAME)
    if packed is None:
        return None
    try:
        out = zlib.decompressobj().decompress(base64.b64decode(packed, validate=True), MAX_MAP)
        return out.decode("utf-8")
    except (binascii.Error, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the weight map packed in the metadata is corrupt ({exc}); use the "
                          "OUT.map.json written with it") from exc


def _from_archive(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith("/extra/" + MAP_NAME)), None)
        if name is None:
            raise ConfigError(f"{str(path)!r} holds no weight map (it was not written by "
                              "'fxfuse fuse'); give the OUT.map.json written with the model")
        if zf.getinfo(name).file_size > MAX_MAP:
            raise ConfigError(f"the weight map in {str(path)!r} is over {MAX_MAP >> 30} GiB")
        return zf.read(name).decode("utf-8")


def _from_safetensors(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        text = map_from_metadata(handle.metadata())
    if text is None:
        raise ConfigError(f"{str(path)!r} holds no weight map in its metadata; give the "
                          "OUT.map.json written with it")
    return text


def read_map_text(path: Path) -> str:
    """The map's JSON text from a ``.map.json`` file, or from inside a ``.pt2`` or a
    ``.safetensors`` written by ``fxfuse fuse``.

    Raises:
        ConfigError: not readable, no map inside, not UTF-8 (one line, with the fix).
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt2":
            return _from_archive(path)
        if suffix == ".safetensors":
            return _from_safetensors(path)
        if path.stat().st_size > MAX_MAP:
            raise ConfigError(f"weight map {str(path)!r} is over {MAX_MAP >> 30} GiB; give "
                              "the OUT.map.json written by 'fxfuse fuse'")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not a weight map (not UTF-8 text); give the "
                          "OUT.map.json written by 'fxfuse fuse', or the .pt2/.safetensors "
                          "that holds it") from exc
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip and safetensors errors have many types
        raise ConfigError(f"cannot read the weight map in {str(path)!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); the file looks "
                          "truncated or corrupt") from exc
