"""Where and how fxfuse writes a file: the output path checked before any work (never an
input, a known suffix, a writable directory) and the atomic write through a temporary
name in the same directory (see :mod:`fxfuse.io.transaction`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Literal

from .checkpoints import first_line
from .transaction import OutputSet, os_problem, probe_writable
from ..errors import ConfigError

log = logging.getLogger("fxfuse")

SAVE_FORMATS: dict[str, Literal["export", "pickle", "safetensors"]] = {
    ".pt2": "export", ".pt": "pickle", ".pth": "pickle", ".safetensors": "safetensors"}


def format_of(out: Path) -> Literal["export", "pickle", "safetensors"]:
    """The save format ``out``'s suffix names, or a one-line refusal."""
    fmt = SAVE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot save to {str(out)!r}: unknown suffix {out.suffix!r}; use "
                          ".pt2 (torch.export), .pt/.pth (pickled GraphModule) or .safetensors "
                          "(weights only)")
    return fmt


def check_directory(out: Path) -> None:
    """ConfigError unless ``out`` can be created or replaced in its directory."""
    parent = out.parent
    if not parent.exists():
        raise ConfigError(f"directory {str(parent)!r} of output {str(out)!r} does not exist; "
                          "create it first")
    if not parent.is_dir():
        raise ConfigError(f"{str(parent)!r} is not a directory; fix the output path {str(out)!r}")
    if out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a directory; give a file name")
    probe_writable(out)


def resolved(path: Path, what: str = "output") -> Path:
    """``path.resolve()``, or one ConfigError line when it cannot be resolved (a loop of
    symbolic links: RuntimeError before Python 3.13, OSError ELOOP after)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"cannot use {what} {str(path)!r}: it is a loop of symbolic links "
                          "(or a link that cannot be followed); remove the link or choose "
                          "another name") from exc


def _is_same_file(a: Path, b: Path) -> bool:
    if resolved(a) == resolved(b, "input"):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_output_path(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that would overwrite an input, has an unknown suffix, or cannot
    be written; do it before any work is done.

    Args:
        out: the output file (``.pt2``, ``.pt`` or ``.safetensors``).
        inputs: every file read to build the model (``LoadedModel.paths``).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ConfigError: one line naming the problem and the fix.
    """
    out = Path(out).expanduser()
    try:
        return _check_output_path(out, inputs)
    except OSError as exc:  # a name too long, a loop of links, ...
        raise os_problem(exc, out, "write") from exc


def _check_output_path(out: Path, inputs: Iterable[str | Path]) -> Path:
    for source in inputs:
        if _is_same_file(out, Path(source)):
            raise ConfigError(f"output {str(out)!r} is the input file {str(source)!r}; fxfuse "
                              "never overwrites its input, choose another output name")
    format_of(out)
    check_directory(out)
    return out


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``writer(temp_path)``, then move it into place at once.

    The temp file (see :mod:`fxfuse.io.transaction`) is created first, which is the real
    check that the directory is writable; on any failure it is removed and ``path`` is
    untouched.

    Args:
        path: the file to create or replace.
        writer: called with the temporary path; must write the whole file there.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: the directory is missing or not writable, or an ``OSError`` while
            writing (disk full, say), in one line.
        Exception: whatever ``writer`` raises, unchanged, after the clean-up.
    """
    path = Path(path).expanduser().absolute()
    check_directory(path)
    with OutputSet([path]) as outputs:
        try:
            writer(outputs.temps[path])
        except OSError as exc:
            raise ConfigError(f"could not write {str(path)!r} ({first_line(exc)})") from exc
        outputs.write(path, outputs.temps[path].read_bytes())
        outputs.commit()
    log.info("wrote %s", path)
    return path


def write_sidecar(out: str | Path, name_suffix: str, text: str | bytes) -> Path:
    """Atomically write ``text`` next to ``out`` as ``OUT + name_suffix`` (``m.pt2.map.json``).

    Returns:
        The sidecar's path.
    """
    if not name_suffix or "/" in name_suffix or os.sep in name_suffix:
        raise ConfigError(f"bad sidecar suffix {name_suffix!r}; use e.g. '.map.json'")
    out = Path(out).expanduser()
    path = out.with_name(out.name + name_suffix)
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
