"""Read model and weight files: torch.export archives, pickled modules, state_dicts.

Every failure is a :class:`~fxfuse.errors.ConfigError` whose one line names the file,
the problem and the fix; a truncated or corrupt file never escapes as a raw
``RuntimeError``/``UnpicklingError``/``SafetensorError``.
"""
from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from torch import nn

from ..compat import muted_logger
from ..errors import ConfigError, first_line  # noqa: F401 - first_line: io helpers
from ..running import torch_warnings_muted
from ..trace.export import keep_input_checks
from .pretrained import read_pretrained
from .torchscript import refuse_torchscript

log = logging.getLogger("fxfuse")

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MODEL_FORMS = ("give MODEL as package.module:factory, path/to/file.py:factory, a "
               "torch.export archive file.pt2, or a pickled file.pt with --allow-pickle")
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError,
               ValueError, KeyError, IndexError, SafetensorError)


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` resolved, or ConfigError when it is missing or not a file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist; check the path")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} is not a file; give the file itself")
    return p.resolve()


def _read(path: Path, what: str, reader: Callable[[], Any]) -> Any:
    """Run ``reader``; a truncated or corrupt file becomes one ConfigError line."""
    try:
        return reader()
    except _UNREADABLE as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r} ({first_line(exc)}); the file "
                          "looks truncated or corrupt: save or download it again") from exc


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, Any]:
    """The state_dict inside a loaded weights file (plain, or under 'state_dict'/'model')."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else ""
    raise ConfigError(f"weights {str(path)!r} hold a {type(obj).__name__}"
                      f"{f' (keys: {keys})' if keys else ''}, not a state_dict; save "
                      "torch.save(model.state_dict(), path) or a .safetensors file")


def _needs_pickle(exc: BaseException | None) -> bool:
    """Whether a ``weights_only`` load failed on a Python global (not on corruption)."""
    return isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower()


def _is_raw_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a pickle stream (protocol 2+), not a torch.save zip."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_weights(path: Path, allow_pickle: bool) -> Mapping[str, Any]:
    """The state_dict stored in ``path`` (``.safetensors`` or a torch.save pickle, or a
    ``save_pretrained`` directory of them)."""
    if path.is_dir():
        return read_pretrained(path, lambda p: read_weights(p, allow_pickle))
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        return _read(path, "weights", lambda: load_file(str(path), device="cpu"))
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise ConfigError(f"weights {str(path)!r}: unknown suffix; use .pt, .pth, .bin, "
                          ".ckpt or .safetensors")
    refuse_torchscript(path, "weights")
    try:
        obj = _read(path, "weights", lambda: torch.load(
            path, weights_only=not allow_pickle, map_location="cpu"))
    except ConfigError as exc:
        if _is_raw_pickle(path) and "weights only load failed" in str(exc.__cause__).lower():
            raise ConfigError(f"weights {str(path)!r} are a plain pickle (pickle.dump, not "
                              "torch.save); unpickling runs arbitrary code, so pass "
                              "--allow-pickle only for files you trust, or re-save the "
                              "state_dict with torch.save or as .safetensors") from exc.__cause__
        if _needs_pickle(exc.__cause__):
            raise ConfigError(f"weights {str(path)!r} hold pickled Python objects, not just "
                              "tensors; unpickling runs arbitrary code, so pass --allow-pickle "
                              "only for files you trust, or re-save the state_dict as "
                              ".safetensors") from exc.__cause__
        raise
    return _state_dict_of(obj, path)


def _shape_clash(file_value: Any, own_value: Any) -> bool:
    """Both are materialised tensors and their shapes differ."""
    return (isinstance(file_value, torch.Tensor) and isinstance(own_value, torch.Tensor)
            and not isinstance(own_value, nn.parameter.UninitializedTensorMixin)
            and file_value.shape != own_value.shape)


def _listed(label: str, items: list[str]) -> str:
    """``"N label (a, b, c, d, ...)"``: the count and the first four items."""
    more = ", ..." if len(items) > 4 else ""
    return f"{len(items)} {label} ({', '.join(items[:4])}{more})"


def _mismatch(model: nn.Module, sd: Mapping[str, Any]) -> str | None:
    """One line listing missing, unexpected and wrongly shaped keys, or None if all fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and _shape_clash(sd[k], own[k])]
    parts = [_listed(label, items)
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatches file vs model", shapes)) if items]
    prefix = common_prefix(list(sd))
    if unexpected and prefix:
        parts.append(f"every key in the file starts with {prefix!r}, and stripping it does "
                     "not fit either; re-save the state_dict of the inner model")
    return "; ".join(parts) or None


def common_prefix(keys: list[str]) -> str:
    """The first dotted component all ``keys`` share (``"model."``), or ''."""
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(heads) != 1 or not all("." in k for k in keys):
        return ""
    return heads.pop() + "."


def _strip_prefix(model: nn.Module, sd: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """``sd`` with a common key prefix removed (``model.`` of Lightning, ``module.`` of
    DataParallel) when that makes its keys exactly the model's; else ``sd`` unchanged."""
    own = set(model.state_dict())
    prefix = common_prefix(list(sd))
    if not prefix or set(sd) == own:
        return sd, ""
    stripped = {k[len(prefix):]: v for k, v in sd.items()}
    return (stripped, prefix) if set(stripped) == own else (sd, "")


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "floating" if t.is_floating_point() else "integer"


def _kind_mismatch(model: nn.Module, sd: Mapping[str, Any]) -> str | None:
    """A line naming the first tensor whose kind (bool, complex, integer, floating) differs
    from the model's: load_state_dict would cast it silently, dropping the imaginary part
    or turning True into 1.0."""
    own = model.state_dict()
    for key, value in sd.items():
        mine = own.get(key)
        if isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) \
                and _kind(value) != _kind(mine) and _kind(value) in ("bool", "complex"):
            return (f"{key} is {value.dtype} in the file but {mine.dtype} in the model, and "
                    "casting would change its values")
    return None


def apply_weights(model: nn.Module, path: Path, allow_pickle: bool) -> None:
    """Load the state_dict in ``path`` into ``model``, strictly.

    A prefix every key shares (``model.`` in a Lightning ``.ckpt``, ``module.`` from
    DataParallel) is stripped when the stripped keys are exactly the model's.

    Args:
        model: the freshly built model.
        path: ``.pt``/``.pth``/``.bin``/``.ckpt`` (read with ``weights_only=True`` unless
            ``allow_pickle``) or ``.safetensors``.
        allow_pickle: allow Python objects besides tensors in a pickled file.

    Raises:
        ConfigError: unreadable file, no state_dict inside, or keys/shapes that do not
            fit (the message lists the first few missing, unexpected and mis-shaped keys).
    """
    sd, prefix = _strip_prefix(model, read_weights(path, allow_pickle))
    if prefix:
        log.info("every key in %s starts with %r (a Lightning or DataParallel checkpoint); "
                 "stripped it", path.name, prefix)
    problem = _mismatch(model, sd) or _kind_mismatch(model, sd)
    if problem:
        raise ConfigError(f"weights {str(path)!r} do not fit {type(model).__name__}: {problem}; "
                          "check the factory builds the architecture they were saved from")
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"weights {str(path)!r} do not fit {type(model).__name__} "
                          f"({first_line(exc)})") from exc


def load_export(path: Path, allow_pickle: bool = False,
                announce: Callable[[str], None] | None = None
                ) -> tuple[nn.Module, list[str], Any]:
    """The module of the ``torch.export`` archive ``path`` (``ExportedProgram.module()``).

    The archive is inspected first (:func:`~fxfuse.io.archive.inspect_archive`) and torch
    is handed the very bytes inspected, never the path.

    Returns:
        The module, one line per part that unpickled or ran code (only with
        ``allow_pickle``; empty for a plain program), and the ``ExportedProgram``.

    Raises:
        announce: called with one line before torch unpickles or runs anything (with
            ``allow_pickle``); default: a log warning.

    Raises:
        ConfigError: the archive needs pickle or runs code (without ``allow_pickle``), is
            a zip bomb, truncated, corrupt or from an incompatible torch.
    """
    from .archive import inspect_archive
    try:
        report = inspect_archive(path, allow_pickle)
    except ConfigError:
        raise
    except _UNREADABLE as exc:
        _read(path, "torch.export archive", lambda: (_ for _ in ()).throw(exc))
        raise
    if report.runs:  # said before torch runs any of it
        (announce or log.warning)(f"--allow-pickle: loading {str(path)!r} will unpickle or run "
                                  f"code from the file: {'; '.join(report.runs)}")

    try:
        with torch_warnings_muted(), muted_logger("torch.export"):  # torch logs its legacy-layout path
            program = torch.export.load(io.BytesIO(report.data))
            module = program.module()
    except Exception as exc:  # noqa: BLE001 - deserialisation errors have many types
        raise _load_failure(path, report, exc) from exc
    keep_input_checks(module)
    return module, report.runs, program


def _load_failure(path: Path, report: Any, exc: Exception) -> ConfigError:
    """One line for a ``torch.export.load`` failure, naming the torch that wrote the
    archive (where it says) and the one reading it."""
    cause, versions = first_line(exc), report.versions()
    unreadable = report.unreadable_here()
    if unreadable:
        return ConfigError(f"cannot load torch.export archive {str(path)!r}: {versions}, "
                           f"which cannot read {unreadable}; re-export the model "
                           f"with torch {torch.__version__}, or load the file with the torch "
                           "that wrote it")
    if isinstance(exc, _UNREADABLE):
        return ConfigError(f"cannot read torch.export archive {str(path)!r} ({cause}; "
                           f"{versions}); the file looks truncated or corrupt: save or "
                           "download it again")
    return ConfigError(f"cannot load torch.export archive {str(path)!r} ({cause}; {versions}); "
                       f"re-export it with torch {torch.__version__}")


def load_pickle(path: Path, allow_pickle: bool) -> nn.Module:
    """The whole module pickled in ``path``; refused unless ``allow_pickle``.

    Raises:
        ConfigError: unpickling not allowed, the file is a state_dict (with the hint to use
            a factory and ``--weights``), a TorchScript archive, truncated or corrupt.
    """
    refuse_torchscript(path, "MODEL")
    hint = (f"{str(path)!r} is a state_dict; give the model as pkg.module:factory and this "
            "file as --weights")
    if path.suffix.lower() == ".safetensors":
        raise ConfigError(hint)
    try:
        obj = _read(path, "model", lambda: torch.load(path, weights_only=not allow_pickle,
                                                      map_location="cpu"))
    except ConfigError as exc:
        cause = exc.__cause__
        if "TorchScript" in str(cause):
            raise ConfigError(f"{str(path)!r} is a TorchScript archive, which torch.fx cannot "
                              "trace; give the Python model as pkg.module:factory") from cause
        if not allow_pickle and _needs_pickle(cause):
            raise ConfigError(f"{str(path)!r} holds a pickled model; unpickling runs arbitrary "
                              "code, so pass --allow-pickle only for files you trust (or give "
                              "pkg.module:factory --weights with a state_dict)") from cause
        raise
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"unpickling {str(path)!r} needs the code that defined its classes "
                          f"({first_line(exc)}); put that package on PYTHONPATH") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling runs arbitrary code
        raise ConfigError(f"unpickling {str(path)!r} failed ({first_line(exc)}); re-save "
                          "the model or give it as pkg.module:factory") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise ConfigError(hint)
    raise ConfigError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module; "
                      f"{MODEL_FORMS}")
