"""Write the rewritten model, atomically, in the format its file name asks for.

``.pt2`` is a ``torch.export`` archive (dynamic batch where the model allows it) that
loads with bare torch; ``.pt`` is the pickled ``GraphModule``; ``.safetensors`` holds
the weights only. Every file is written to a temporary name in the same directory and
moved into place with ``os.replace``, so a failed save never leaves a half-written
file, and an existing output is only ever swapped whole.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .checkpoints import first_line
from ..errors import ConfigError, TraceError

log = logging.getLogger("fxfuse")

SAVE_FORMATS: dict[str, Literal["export", "pickle", "safetensors"]] = {
    ".pt2": "export", ".pt": "pickle", ".safetensors": "safetensors"}


@dataclass(frozen=True)
class SavedModel:
    """What :func:`save_model` wrote.

    Attributes:
        path: the output file.
        format: ``"export"``, ``"pickle"`` or ``"safetensors"``.
        dynamic_batch: True when a ``.pt2`` accepts any batch size (dim 0 of every
            tensor input is symbolic); False for static archives and other formats.
    """

    path: Path
    format: Literal["export", "pickle", "safetensors"]
    dynamic_batch: bool = False


def _format_of(out: Path) -> Literal["export", "pickle", "safetensors"]:
    fmt = SAVE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot save to {str(out)!r}: unknown suffix {out.suffix!r}; use "
                          ".pt2 (torch.export), .pt (pickled GraphModule) or .safetensors "
                          "(weights only)")
    return fmt


def _check_directory(out: Path) -> None:
    """ConfigError unless ``out`` can be created or replaced in its directory."""
    parent = out.parent
    if not parent.exists():
        raise ConfigError(f"directory {str(parent)!r} of output {str(out)!r} does not exist; "
                          "create it first")
    if not parent.is_dir():
        raise ConfigError(f"{str(parent)!r} is not a directory; fix the output path {str(out)!r}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"directory {str(parent)!r} is not writable; choose another output "
                          "path")
    if out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a directory; give a file name")


def _is_same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
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
    for source in inputs:
        if _is_same_file(out, Path(source)):
            raise ConfigError(f"output {str(out)!r} is the input file {str(source)!r}; fxfuse "
                              "never overwrites its input, choose another output name")
    _format_of(out)
    _check_directory(out)
    return out


def _new_file_mode(path: Path) -> int:
    """The permission bits the output should get: the old file's, or 0o666 less umask."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``writer(temp_path)``, then move it into place at once.

    The temporary file lives in the same directory with the same suffix (some writers
    check it) and is removed on any failure, so ``path`` is either untouched or whole.

    Args:
        path: the file to create or replace.
        writer: called with the temporary path; must write the whole file there.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: the directory is missing or not writable (checked before calling
            ``writer``), or an ``OSError`` while writing (disk full, say).
        Exception: whatever ``writer`` raises, unchanged, after the clean-up.
    """
    path = Path(path).expanduser()
    _check_directory(path)
    mode = _new_file_mode(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ConfigError(f"could not write {str(path)!r} ({first_line(exc)})") from exc
        raise
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


def _batch_dims(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0
                 else None for x in inputs)


def _has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """True when dim 0 of every tensor user input of ``program`` is symbolic."""
    names = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes
            if n.op == "placeholder" and n.name in names]
    tensors = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() > 0]
    return bool(tensors) and not any(is_concrete_int(v.shape[0]) for v in tensors)


def _export(gm: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dim where possible, else with static shapes."""
    try:
        return torch.export.export(gm, inputs, dynamic_shapes=_batch_dims(inputs), strict=False)
    except Exception as exc:  # noqa: BLE001 - a dynamic batch is a bonus; fall back
        log.info("export with a dynamic batch failed (%s); exporting static shapes",
                 first_line(exc))
    try:
        return torch.export.export(gm, inputs, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"torch.export could not export the model ({first_line(exc)}); "
                         "save as .pt or .safetensors instead") from exc


def _as_text(extra_files: Mapping[str, bytes | str] | None) -> dict[str, str] | None:
    if not extra_files:
        return None
    try:
        return {name: v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for name, v in extra_files.items()}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"extra files must be UTF-8 text ({first_line(exc)})") from exc


def _safetensors_dict(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as contiguous CPU tensors, each owning its storage (tied or view
    tensors are cloned: safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in gm.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"state_dict entry {key!r} is a {type(value).__name__}, which "
                              ".safetensors cannot hold; save as .pt2 or .pt")
        t = value.detach().cpu()
        storage = t.untyped_storage()
        owns = (t.is_contiguous() and t.storage_offset() == 0
                and storage.nbytes() == t.numel() * t.element_size())
        if not owns or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


@contextlib.contextmanager
def _without_string_annotations(gm: torch.nn.Module) -> Iterator[None]:
    """Hide string type annotations (``from __future__ import annotations`` in the
    model's source) while pickling: GraphModule's pickler cannot name a str type."""
    nodes = [n for n in gm.graph.nodes if isinstance(n.type, str)] \
        if isinstance(gm, fx.GraphModule) else []
    saved = [n.type for n in nodes]
    for node in nodes:
        node.type = None
    if nodes:
        gm.recompile()  # GraphModule.__reduce__ copies the current code before recompiling
    try:
        yield
    finally:
        for node, kind in zip(nodes, saved):
            node.type = kind
        if nodes:
            gm.recompile()


def save_model(gm: fx.GraphModule | torch.nn.Module, out: str | Path,
               example_inputs: tuple[Any, ...], *,
               extra_files: Mapping[str, bytes | str] | None = None) -> SavedModel:
    """Save ``gm`` to ``out`` in the format its suffix names, atomically.

    Args:
        gm: the (rewritten) model.
        out: ``.pt2`` (``torch.export``, batch dim dynamic when the model allows),
            ``.pt`` (``torch.save`` of the module) or ``.safetensors`` (weights only).
        example_inputs: positional inputs for export (``.pt2`` only).
        extra_files: name → UTF-8 text stored inside a ``.pt2`` (read back with
            ``torch.export.load(path, extra_files={name: ""})``) or as the metadata of a
            ``.safetensors``; a ``.pt`` cannot hold them (use :func:`write_sidecar`).

    Returns:
        A :class:`SavedModel`.

    Raises:
        ConfigError: bad suffix, unwritable directory, unpicklable model.
        TraceError: ``torch.export`` could not export the model.
    """
    out = Path(out).expanduser()
    fmt = _format_of(out)
    _check_directory(out)
    texts = _as_text(extra_files)
    if fmt == "export":
        program = _export(gm, tuple(example_inputs))
        atomic_write(out, lambda tmp: torch.export.save(program, tmp, extra_files=texts))
        return SavedModel(out, fmt, _has_dynamic_batch(program))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        tensors = _safetensors_dict(gm)
        atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=texts))
        return SavedModel(out, fmt)
    if texts:
        log.warning("a .pt file cannot hold extra files (%s); write them as sidecars",
                    ", ".join(texts))
    try:
        with _without_string_annotations(gm):
            atomic_write(out, lambda tmp: torch.save(gm, tmp))
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"cannot pickle the model to {str(out)!r} ({first_line(exc)}); "
                          "save as .pt2 instead") from exc
    return SavedModel(out, fmt)
