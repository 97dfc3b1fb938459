"""Inspect a ``torch.export`` archive before torch reads a byte of it.

``torch.export.load`` unpickles parts of a ``.pt2`` with ``weights_only=False`` (sample
inputs it cannot read weights-only, weights and constants flagged ``use_pickle``,
opaque and custom objects) and builds AOTInductor entries by running the compiler
command stored in the archive. :func:`inspect_archive` reads only the zip directory
and the small JSON configs, and refuses, with one line naming the entry:

- any entry outside the allow-list of a plain exported program (AOTInductor,
  ExecuTorch, legacy pickled weights/constants, opaque or custom objects, ...);
- a weight or constant whose config entry says ``use_pickle``;
- sample inputs that do not load with ``torch.load(weights_only=True)``;
- entries whose declared uncompressed size is out of proportion (zip bombs), and
  duplicate entry names (two readers could disagree on which one counts).

With ``allow_pickle=True`` nothing is refused for needing pickle or code; the findings
come back as a list of what will run, for the caller to tell the user.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

MAX_RATIO = 20                     # declared size / stored size of one entry
RATIO_FLOOR = 1 << 20              # entries under 1 MiB are never bombs
MAX_ENTRY = 16 << 30               # no single entry over 16 GiB
MAX_CONFIG = 64 << 20              # JSON read here: at most 64 MiB each
_NAME = r"[A-Za-z0-9_.-]+"
_ALLOWED = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"version",
    r"\.data/version", r"\.data/serialization_id",
    rf"models/{_NAME}\.json",
    rf"data/weights/{_NAME}_weights_config\.json", r"data/weights/weight_\d+",
    rf"data/constants/{_NAME}_constants_config\.json", r"data/constants/tensor_\d+",
    rf"data/sample_inputs/{_NAME}\.pt",
    r"extra/[^/]+",
)]
# The flat layout ``torch.export.save`` wrote up to torch 2.7 (no root folder): the program
# as JSON, weights, constants and sample inputs as ``torch.save`` files (read weights-only
# here, as torch 2.6+ reads them; older torch unpickles them in full).
_FLAT_PROGRAM = "serialized_exported_program.json"
_FLAT_PICKLES = {"serialized_state_dict.pt": "weights", "serialized_constants.pt": "constants",
                 "serialized_example_inputs.pt": "sample inputs"}
_FLAT_ALLOWED = [re.compile(p) for p in (
    r"version", re.escape(_FLAT_PROGRAM), *(re.escape(n) for n in _FLAT_PICKLES),
    r"extra_files/[^/]+",
)]
_WHAT = {"data/aotinductor/": "an AOTInductor build (runs its compiler command)",
         "data/executorch/": "an ExecuTorch program",
         "data/constants/opaque_obj_": "a pickled opaque object",
         "data/constants/custom_obj_": "a pickled custom object"}


@dataclass
class ArchiveReport:
    """What :func:`inspect_archive` found.

    Attributes:
        data: the archive's bytes, as inspected (hand these, not the path, to torch).
        runs: one line per part that unpickles or runs code (empty for a plain program).
        layout: ``"pt2"`` (one root folder, as torch 2.13 writes) or ``"flat"`` (as torch
            2.4 to 2.6 write; torch's own loader calls it the format of 2.7 and before).
        writer: the torch version that wrote it, where the archive records one (2.5 on).
        schema: its export schema version (``"8.2"``), where readable.
    """

    data: bytes
    runs: list[str] = field(default_factory=list)
    layout: str = "pt2"
    writer: str | None = None
    schema: str | None = None

    def versions(self) -> str:
        """``written by torch A (export schema a), read by torch B (export schema b)``."""
        wrote = f"torch {self.writer}" if self.writer else "a torch that does not record its version"
        wrote += f" (export schema {self.schema})" if self.schema else ""
        reads = reader_schema()
        return (f"written by {wrote}, read by torch {torch.__version__}"
                + (f" (export schema {reads})" if reads else ""))

    def unreadable_here(self) -> str | None:
        """What of the archive this torch cannot read (its layout or its schema's major
        version), or None when it should read it."""
        if self.layout == "pt2" and importlib.util.find_spec("torch.export.pt2_archive") is None:
            return "the pt2-archive layout (one root folder)"
        reads = reader_schema()
        if self.schema and reads and self.schema.split(".")[0] != reads.split(".")[0]:
            return f"export schema {self.schema}"
        return None


def reader_schema() -> str | None:
    """The export schema version this torch writes and reads (``"5.3"``), if it says."""
    try:
        from torch._export.serde.schema import SCHEMA_VERSION
    except ImportError:
        return None
    return ".".join(map(str, SCHEMA_VERSION))


def _refuse(path: Path, entry: str, why: str, allow: bool, runs: list[str]) -> None:
    if allow:
        runs.append(f"{entry}: {why}")
        return
    raise ConfigError(f"refusing {str(path)!r}: entry {entry!r} is {why}; loading it runs "
                      "code from the file, pass --allow-pickle only for archives you trust")


def _check_sizes(path: Path, infos: list[zipfile.ZipInfo], total: int) -> None:
    names = set()
    for info in infos:
        if info.filename in names:
            raise ConfigError(f"refusing {str(path)!r}: entry {info.filename!r} appears twice; "
                              "re-export the model with torch.export.save")
        names.add(info.filename)
        declared, stored = info.file_size, max(info.compress_size, 1)
        bomb = declared > RATIO_FLOOR and declared > MAX_RATIO * stored
        if bomb or declared > MAX_ENTRY:
            raise ConfigError(
                f"refusing {str(path)!r}: entry {info.filename!r} declares "
                f"{declared / 2**20:.0f} MiB uncompressed from {stored / 2**20:.2f} MiB stored "
                f"(limit {MAX_RATIO}x and {MAX_ENTRY >> 30} GiB); the archive looks like a zip "
                "bomb, re-export the model with torch.export.save")
    declared = sum(i.file_size for i in infos)
    if declared > MAX_RATIO * total + RATIO_FLOOR:
        raise ConfigError(f"refusing {str(path)!r}: its entries declare {declared / 2**20:.0f} "
                          f"MiB in a {total / 2**20:.2f} MiB file; the archive looks like a zip "
                          "bomb, re-export the model with torch.export.save")


def _read_json(zf: zipfile.ZipFile, path: Path, name: str) -> dict:
    info = zf.getinfo(name)
    if info.file_size > MAX_CONFIG:
        raise ConfigError(f"refusing {str(path)!r}: {name!r} declares {info.file_size} bytes, "
                          "too large for a config; re-export the model")
    try:
        data = json.loads(zf.read(name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"cannot read {name!r} in {str(path)!r} ({type(exc).__name__}); the "
                          "file looks truncated or corrupt: save or download it again") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{name!r} in {str(path)!r} is not a JSON object; the file looks "
                          "corrupt: save or download it again")
    return data


def _check_payloads(zf: zipfile.ZipFile, path: Path, root: str, allow: bool,
                    runs: list[str]) -> None:
    """Refuse weights/constants flagged ``use_pickle`` or stored outside tensor files."""
    for name in zf.namelist():
        short = name[len(root):]
        if not short.endswith(("_weights_config.json", "_constants_config.json")):
            continue
        config = _read_json(zf, path, name).get("config", {})
        if not isinstance(config, dict):
            raise ConfigError(f"{name!r} in {str(path)!r} has no config mapping; the file "
                              "looks corrupt: save or download it again")
        for fqn, meta in config.items():
            meta = meta if isinstance(meta, dict) else {}
            entry = f"{name.rsplit('/', 1)[0]}/{meta.get('path_name', '?')}"
            if meta.get("use_pickle"):
                _refuse(path, entry, f"{fqn!r} flagged use_pickle in {short}", allow, runs)
            elif not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
                _refuse(path, entry, f"{fqn!r}, not a plain tensor file", allow, runs)


def _check_weights_only(zf: zipfile.ZipFile, path: Path, name: str, allow: bool,
                        runs: list[str], what: str = "sample inputs") -> None:
    """torch reads these weights-only, then falls back to full unpickling."""
    blob = zf.read(name)
    if not blob:
        return
    try:
        torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - anything but a weights-only success needs pickle
        _refuse(path, name, f"{what} that need full unpickling", allow, runs)


def _open_zip(path: Path, data: bytes) -> zipfile.ZipFile:
    """The bytes of ``path`` as a zip, or a one-line refusal when they are not one."""
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read torch.export archive {str(path)!r} ({type(exc).__name__}"
                          f": {exc}); the file looks truncated or corrupt: save or download "
                          "it again") from exc


def _single_root(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    """The one root folder (with its trailing slash) every entry lives under; ``""`` for
    the flat layout (``serialized_exported_program.json`` at the top)."""
    if any(i.filename == _FLAT_PROGRAM for i in infos):
        return ""
    roots = {i.filename.split("/", 1)[0] + "/" for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        raise ConfigError(f"{str(path)!r} is not a torch.export archive (neither one root "
                          f"folder nor {_FLAT_PROGRAM}; read by torch {torch.__version__}); "
                          "re-export the model with torch.export.save")
    return roots.pop()


def _recorded_versions(zf: zipfile.ZipFile, path: Path, root: str) -> tuple[str | None, str | None]:
    """The torch version and export schema the program JSON records (None where not)."""
    names = [n for n in zf.namelist() if n == _FLAT_PROGRAM
             or re.fullmatch(rf"{re.escape(root)}models/{_NAME}\.json", n)]
    try:
        data = _read_json(zf, path, names[0]) if names else {}
    except ConfigError:
        return None, None
    writer, schema = data.get("torch_version"), data.get("schema_version")
    if isinstance(schema, dict) and {"major", "minor"} <= set(schema):
        schema = f"{schema['major']}.{schema['minor']}"
    return (str(writer) if writer else None), (schema if isinstance(schema, str) else None)


def _check_entries(zf: zipfile.ZipFile, path: Path, root: str,
                   infos: list[zipfile.ZipInfo], allow_pickle: bool, runs: list[str]) -> None:
    """Refuse (or, with ``allow_pickle``, report in ``runs``) every entry that is not part
    of a plain exported program; name the command a compile-flags entry would run."""
    allowed = _ALLOWED if root else _FLAT_ALLOWED
    for info in infos:
        short = info.filename[len(root):]
        if info.is_dir() or any(p.fullmatch(short) for p in allowed):
            continue
        why = next((w for prefix, w in _WHAT.items() if short.startswith(prefix)),
                   "not part of a plain exported program")
        _refuse(path, info.filename, why, allow_pickle, runs)
        if short.endswith("compile_flags.json") and allow_pickle:
            flags = _read_json(zf, path, info.filename)
            runs.append(f"{info.filename}: runs the command {flags.get('compiler')!r}")


def inspect_archive(path: Path, allow_pickle: bool = False) -> ArchiveReport:
    """Read ``path`` once and check it is a plain ``torch.export`` program.

    Args:
        path: the ``.pt2`` file.
        allow_pickle: report (instead of refusing) parts that unpickle or run code.

    Returns:
        An :class:`ArchiveReport` with the bytes inspected.

    Raises:
        ConfigError: one line naming the entry at fault and the way out.
    """
    data = path.read_bytes()
    zf = _open_zip(path, data)
    with zf:
        infos = zf.infolist()
        _check_sizes(path, infos, len(data))
        root = _single_root(path, infos)
        runs: list[str] = []
        _check_entries(zf, path, root, infos, allow_pickle, runs)
        if root:
            _check_payloads(zf, path, root, allow_pickle, runs)
        for info in infos:
            if root and info.filename[len(root):].startswith("data/sample_inputs/"):
                _check_weights_only(zf, path, info.filename, allow_pickle, runs)
            elif not root and info.filename in _FLAT_PICKLES:
                _check_weights_only(zf, path, info.filename, allow_pickle, runs,
                                    _FLAT_PICKLES[info.filename])
        writer, schema = _recorded_versions(zf, path, root)
    return ArchiveReport(data, runs, "pt2" if root else "flat", writer, schema)
