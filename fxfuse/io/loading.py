"""Load the model the command line names, and make its example inputs.

MODEL is one of ``package.module:factory`` (a dotted attribute path is allowed,
``mod:Cls.build``), ``path/to/file.py:factory``, a ``torch.export`` archive ``file.pt2``,
or a whole pickled module ``file.pt`` (only with ``allow_pickle=True``: unpickling runs
code from the file). Weights for a factory come from ``--weights`` (``.pt``/``.pth``/
``.bin`` state_dict, loaded with ``weights_only=True``, or ``.safetensors``).
Every failure is a :class:`~fxfuse.errors.ConfigError` whose one line names the problem
and the fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from .checkpoints import (MODEL_FORMS, PICKLE_SUFFIXES, apply_weights, existing_file,
                          first_line, load_export, load_pickle)
from ..errors import ConfigError
from .inputs import (_parse_device, parse_dtype, parse_input_shapes,  # noqa: F401
                     parse_model_kwargs)

from .programs import ProgramShapes, program_shapes

log = logging.getLogger("fxfuse")

@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the pass, and where it came from.

    Attributes:
        model: the module (in eval mode, except ``torch.export`` modules, which keep the
            mode they were exported in).
        kind: ``"factory"``, ``"export"`` or ``"pickle"``.
        paths: every input file read (model source or archive, weights), resolved; the
            output must be none of them.
        runs: with ``allow_pickle``, one line per part of a ``.pt2`` that unpickled or
            ran code (empty otherwise); the command line shows them as warnings.
        shapes: for a ``.pt2``, its example inputs and dynamic dims (else ``None``).
    """

    model: nn.Module
    kind: Literal["factory", "export", "pickle"]
    paths: tuple[Path, ...]
    runs: tuple[str, ...] = ()
    shapes: ProgramShapes | None = None


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """Put ``directory`` first on ``sys.path`` for the duration (sibling imports)."""
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``(module_or_file, attr_path)`` when ``spec`` is a factory spec, else None."""
    left, sep, right = spec.rpartition(":")
    if not sep or not left:
        return None
    if not right or not all(part.isidentifier() for part in right.split(".")):
        return None
    return left, right


def _import_file(path: Path) -> Any:
    """Execute ``path`` as a fresh module (named after its stem where that is free)."""
    name = path.stem if path.stem.isidentifier() else "fxfuse_model"
    held = sys.modules.get(name)
    if held is not None and getattr(held, "__file__", None) != str(path):
        name = f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r} as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import(target: str) -> tuple[Any, Path | None]:
    """The module named by ``target`` (a dotted name or a ``.py`` path), and its file."""
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if is_file:
            path = existing_file(target, "factory file")
            with _on_sys_path(path.parent):
                return _import_file(path), path
        if not all(p.isidentifier() for p in target.split(".")):
            raise ConfigError(f"{target!r} is not a module name; {MODEL_FORMS}")
        with _on_sys_path(Path.cwd()):
            module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise ConfigError(f"no module named {exc.name!r}; check the spelling, install it "
                              "or add its directory to PYTHONPATH (or give path/to/file.py:"
                              "factory)") from exc
        raise ConfigError(f"importing {target!r} failed ({first_line(exc)}); install the "
                          "missing package") from exc
    except ConfigError:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code (asyncio.CancelledError too)
        raise ConfigError(f"importing {target!r} failed ({first_line(exc)}); fix the error "
                          "in that module") from exc
    source = getattr(module, "__file__", None)
    return module, (Path(source).resolve() if source and Path(source).is_file() else None)


def _build(spec: str, target: str, attr_path: str,
           kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Path | None]:
    """Import ``target``, follow ``attr_path``, call it with ``kwargs`` (none by default)."""
    obj, source = _import(target)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{target!r} has no attribute {attr_path!r}; check the name "
                              f"after ':' in {spec!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}, not a callable; name a class "
                          "or function that builds the model")
    parent = source.parent if source is not None else Path.cwd()
    try:
        with _on_sys_path(parent):
            model = obj(**(kwargs or {}))
    except BaseException as exc:  # noqa: BLE001 - user code (asyncio.CancelledError too)
        given = (f"called with --model-kwargs {json.dumps(kwargs)}" if kwargs else
                 "called with no arguments; give them with --model-kwargs "
                 "'{\"name\": value}'")
        raise ConfigError(f"factory {spec!r} raised {first_line(exc)}; it was {given}, or "
                          "fix the factory") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {spec!r} returned a {type(model).__name__}, not a "
                          "torch.nn.Module; make it return the model")
    return model, source


def _open_model(spec: str, allow_pickle: bool,
                announce: Callable[[str], None] | None = None,
                kwargs: dict[str, Any] | None = None
                ) -> tuple[nn.Module, str, list[Path], list[str], ProgramShapes | None]:
    """Build or read the model named by ``spec``: (model, kind, files read, what ran,
    a program's shapes)."""
    suffix = Path(spec).suffix.lower()
    is_file = suffix in PICKLE_SUFFIXES + (".pt2", ".safetensors") and Path(spec).is_file()
    factory = None if is_file else _split_factory(spec)   # a file named a:b.pt2 is a file
    if factory is not None:
        model, source = _build(spec, *factory, kwargs)
        return model, "factory", [source] if source is not None else [], [], None
    if suffix == ".pt2":
        path = existing_file(spec, "MODEL")
        model, runs, program = load_export(path, allow_pickle, announce)
        return model, "export", [path], runs, program_shapes(program)
    if suffix in PICKLE_SUFFIXES + (".safetensors",):
        path = existing_file(spec, "MODEL")
        with _on_sys_path(Path.cwd()):  # its classes' package, as for a factory
            return load_pickle(path, allow_pickle), "pickle", [path], [], None
    if suffix == ".py":
        raise ConfigError(f"name the factory in {spec!r}: write {spec}:build_model")
    raise ConfigError(f"cannot tell what MODEL {spec!r} is; {MODEL_FORMS}")


def load_model(spec: str, *, weights: str | Path | None = None, allow_pickle: bool = False,
               device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None,
               announce: Callable[[str], None] | None = None,
               model_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Load the model named by ``spec``, apply ``weights``, move it to ``device``/``dtype``.

    Args:
        spec: ``package.module:factory``, ``path/file.py:factory``, ``file.pt2`` or a
            pickled ``file.pt``.
        weights: a state_dict file (``.pt``/``.pth``/``.bin``/``.safetensors``), loaded
            strictly.
        allow_pickle: allow unpickling (runs code from the file) for a whole-module
            ``.pt`` and for weights that hold more than tensors.
        device: where the model should live.
        dtype: floating dtype to cast to (name or ``torch.dtype``); None keeps it.
        announce: told, in one line, what a ``.pt2`` will unpickle or run before it does
            (only with ``allow_pickle``); default: a log warning.
        model_kwargs: keyword arguments for a factory (``--model-kwargs``).

    Returns:
        A :class:`LoadedModel`.

    Raises:
        ConfigError: one line naming the problem and the fix.
    """
    dev = _parse_device(device)
    dt = parse_dtype(dtype) if dtype is not None else None
    if model_kwargs and _split_factory(str(spec)) is None:
        raise ConfigError(f"--model-kwargs applies to a factory (pkg.module:factory), not to "
                          f"{str(spec)!r}; leave it out")
    model, kind, paths, runs, shapes = _open_model(str(spec), allow_pickle, announce, model_kwargs)
    if weights is not None:
        wpath = Path(weights).expanduser().resolve() if Path(weights).expanduser().is_dir() \
            else existing_file(weights, "weights")
        apply_weights(model, wpath, allow_pickle)
        paths.append(wpath)
    try:
        model = model.to(device=dev, dtype=dt) if dt is not None else model.to(device=dev)
    except RecursionError as exc:
        raise ConfigError(f"cannot move the model to {dev}: it is nested too deeply for "
                          "Python's recursion limit; flatten its module tree") from exc
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"cannot move the model to {dev} ({first_line(exc)}); choose an "
                          "available --device") from exc
    if kind != "export":  # export modules refuse .eval(); they keep their exported mode
        model.eval()
    log.info("loaded %s model %s from %s", kind, type(model).__name__, spec)
    return LoadedModel(model=model, kind=kind, paths=tuple(dict.fromkeys(paths)),
                       runs=tuple(runs), shapes=shapes)
