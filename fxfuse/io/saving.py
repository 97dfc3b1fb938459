"""Write the rewritten model, atomically, in the format its file name asks for.

``.pt2`` is a ``torch.export`` archive (dynamic batch where the model allows it) that
loads with bare torch; ``.pt`` is the pickled ``GraphModule``; ``.safetensors`` holds
the weights only. Every file is written to a temporary name in the same directory and
moved into place with ``os.replace``, so a failed save never leaves a half-written
file, and an existing output is only ever swapped whole (the path checks and the
atomic write live in :mod:`fxfuse.io.writing`, and are re-exported here).
"""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .checkpoints import first_line
from .transaction import OutputSet
from .writing import (SAVE_FORMATS, atomic_write, check_directory,  # noqa: F401 - re-exported
                      check_output_path, format_of, write_sidecar)
from ..compat import BatchDims
from ..errors import ConfigError, TraceError

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class SavedModel:
    """What :func:`save_model` wrote.

    Attributes:
        path: the output file.
        format: ``"export"``, ``"pickle"`` or ``"safetensors"``.
        dynamic_batch: True when a ``.pt2`` accepts any batch size (dim 0 of every
            tensor input is symbolic); False for static archives and other formats.
        program: the ``ExportedProgram`` written to a ``.pt2`` (None otherwise).
        kept_dims: the dims other than the batch that the ``.pt2`` accepts at more than
            one size (the input program's :class:`~fxfuse.io.programs.DynamicDim` kept).
    """

    path: Path
    format: Literal["export", "pickle", "safetensors"]
    dynamic_batch: bool = False
    program: Any = field(default=None, repr=False, compare=False)
    kept_dims: tuple[Any, ...] = ()


def _batch_dims(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    batch = BatchDims()
    return tuple({0: batch(x)} if isinstance(x, torch.Tensor) and x.dim() > 0
                 else None for x in inputs)


def _has_dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    """True when dim 0 of every tensor user input of ``program`` is symbolic."""
    names = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes
            if n.op == "placeholder" and n.name in names]
    tensors = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() > 0]
    return bool(tensors) and not any(is_concrete_int(v.shape[0]) for v in tensors)


def _widened(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The inputs at batch 2 when every batched tensor has batch 1 (export specialises a
    size-1 dim to 1), else None."""
    batched = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not batched or any(x.shape[0] != 1 for x in batched):
        return None
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in inputs)


def _same_outputs(program: torch.export.ExportedProgram, gm: torch.nn.Module,
                  inputs: tuple[Any, ...]) -> bool:
    """Whether ``program`` gives ``gm``'s outputs on ``inputs`` (exactly, same code)."""
    try:
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*inputs), gm(*inputs),
                                       rtol=1e-5, atol=1e-6, equal_nan=True)
    except Exception:  # noqa: BLE001 - a guard error or a mismatch: not this program
        return False
    return True


def _export(gm: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dim where possible, else with static shapes.

    A batch-1 example is exported at batch 2 (so the batch stays symbolic), and the
    program is kept only if it also gives ``gm``'s outputs on the batch-1 example.
    """
    wide = _widened(inputs)
    for example in ([wide] if wide is not None else []) + [inputs]:
        try:
            program = torch.export.export(gm, example, dynamic_shapes=_batch_dims(example),
                                          strict=False)
        except Exception as exc:  # noqa: BLE001 - a dynamic batch is a bonus; fall back
            log.info("export with a dynamic batch failed (%s)", first_line(exc))
            continue
        if example is inputs or _same_outputs(program, gm, inputs):
            return program
    try:
        return torch.export.export(gm, inputs, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"torch.export could not export the model ({first_line(exc)}); "
                         "save as .pt or .safetensors instead") from exc


def _dim_spec(inputs: tuple[Any, ...], keep: tuple[Any, ...]) -> tuple[Any, ...]:
    """The batch dims of :func:`_batch_dims` plus each kept dim with its own range."""
    specs = [dict(s) if s else {} for s in _batch_dims(inputs)]
    for d in keep:
        high = None if d.high is None or str(d.high) in ("oo", "int_oo") else int(d.high)
        bounds = {"min": int(d.low)} if str(d.low).lstrip("-").isdigit() else {}
        if high is not None:
            bounds["max"] = high
        specs[d.index][d.dim] = torch.export.Dim(f"input{d.index}_dim{d.dim}", **bounds)
    return tuple(s or None for s in specs)


def _export_keeping(gm: torch.nn.Module, inputs: tuple[Any, ...], keep: tuple[Any, ...]
                    ) -> tuple[torch.export.ExportedProgram, tuple[Any, ...]]:
    """Export with the batch and every dim of ``keep`` dynamic; when torch refuses (the
    rewritten graph fixes one), as :func:`_export` does. Returns the dims kept."""
    keep = tuple(d for d in keep if d.dim != 0 and d.index < len(inputs))
    if keep and _widened(inputs) is None:
        try:
            return torch.export.export(gm, inputs, dynamic_shapes=_dim_spec(inputs, keep),
                                       strict=False), keep
        except Exception as exc:  # noqa: BLE001 - the other dims are a bonus; fall back
            log.info("export keeping %s dynamic failed (%s)",
                     ", ".join(d.describe() for d in keep), first_line(exc))
    return _export(gm, inputs), ()


def _without_provenance(program: torch.export.ExportedProgram) -> None:
    """Drop each node's ``from_node`` provenance (it names graphs by their ``id()``, so
    the same fuse would write other bytes each run; loading does not need it)."""
    for module in program.graph_module.modules():
        for node in getattr(getattr(module, "graph", None), "nodes", ()):
            node.meta.pop("from_node", None)


def _as_text(extra_files: Mapping[str, bytes | str] | None) -> dict[str, str] | None:
    if not extra_files:
        return None
    try:
        return {name: v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for name, v in extra_files.items()}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"extra files must be UTF-8 text ({first_line(exc)})") from exc


def _safetensors_dict(gm: torch.nn.Module,
                      skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The state_dict (less the ``skip`` keys) as contiguous CPU tensors, each owning its
    storage (tied or view tensors are cloned: safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    skipped = set(skip)
    for key, value in gm.state_dict().items():
        if key in skipped:
            continue
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


def non_persistent_keys(model: torch.nn.Module) -> frozenset[str]:
    """The state_dict-style names of ``model``'s non-persistent buffers (tracing turns
    them into ordinary buffers, so the saved weights would carry them)."""
    return frozenset(f"{prefix}{'.' if prefix else ''}{name}"
                     for prefix, module in model.named_modules(remove_duplicate=False)
                     for name in getattr(module, "_non_persistent_buffers_set", ()))


def render_model(gm: fx.GraphModule | torch.nn.Module, out: str | Path,
                 example_inputs: tuple[Any, ...], *,
                 extra_files: Mapping[str, bytes | str] | None = None,
                 non_persistent: Iterable[str] = (),
                 keep_dims: tuple[Any, ...] = ()) -> tuple[bytes, SavedModel]:
    """The bytes of ``gm`` saved in the format ``out``'s suffix names (nothing is written).

    A ``.pt2`` holds no example inputs (the caller's data stays out of the file), and
    keeps dynamic the dims of ``keep_dims`` (an input program's, other than the batch)
    where the rewritten graph allows; a ``.safetensors`` leaves out the
    ``non_persistent`` buffers.

    Returns:
        The file's bytes and a :class:`SavedModel` describing them.

    Raises:
        ConfigError: bad suffix, unpicklable model.
        TraceError: ``torch.export`` could not export the model.
    """
    out = Path(out).expanduser()
    fmt = format_of(out)
    texts = _as_text(extra_files)
    buffer = io.BytesIO()
    if fmt == "export":
        program, kept = _export_keeping(gm, tuple(example_inputs), tuple(keep_dims))
        try:
            program.example_inputs = None  # user data must not end up in the file
        except (AttributeError, TypeError, ValueError):  # older torch: no setter
            program._example_inputs = None
        _without_provenance(program)   # the same fuse writes the same bytes
        torch.export.save(program, buffer, extra_files=texts)
        return buffer.getvalue(), SavedModel(out, fmt, _has_dynamic_batch(program), program,
                                             kept)
    if fmt == "safetensors":
        from safetensors.torch import save
        return save(_safetensors_dict(gm, non_persistent), metadata=texts), SavedModel(out, fmt)
    if texts:
        log.warning("a .pt file cannot hold extra files (%s); write them as sidecars",
                    ", ".join(texts))
    try:
        with _without_string_annotations(gm):
            torch.save(gm, buffer)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"cannot pickle the model to {str(out)!r} ({first_line(exc)}); "
                          "save as .pt2 instead") from exc
    return buffer.getvalue(), SavedModel(out, fmt)


def save_model(gm: fx.GraphModule | torch.nn.Module, out: str | Path,
               example_inputs: tuple[Any, ...], *,
               extra_files: Mapping[str, bytes | str] | None = None,
               non_persistent: Iterable[str] = ()) -> SavedModel:
    """Save ``gm`` to ``out`` in the format its suffix names, atomically.

    Args:
        gm: the (rewritten) model.
        out: ``.pt2`` (``torch.export``, batch dim dynamic when the model allows, no
            example inputs inside), ``.pt`` (``torch.save`` of the module) or
            ``.safetensors`` (weights only).
        example_inputs: positional inputs for export (``.pt2`` only).
        extra_files: name → UTF-8 text stored inside a ``.pt2`` (read back with
            ``torch.export.load(path, extra_files={name: ""})``) or as the metadata of a
            ``.safetensors``; a ``.pt`` cannot hold them (use :func:`write_sidecar`).
        non_persistent: state_dict keys left out of a ``.safetensors``
            (see :func:`non_persistent_keys`).

    Returns:
        A :class:`SavedModel`.

    Raises:
        ConfigError: bad suffix, unwritable directory, full disk, unpicklable model.
        TraceError: ``torch.export`` could not export the model.
    """
    out = Path(out).expanduser().absolute()
    format_of(out)
    check_directory(out)
    with OutputSet([out]) as outputs:
        data, saved = render_model(gm, out, example_inputs, extra_files=extra_files,
                                   non_persistent=non_persistent)
        outputs.write(out, data)
        outputs.commit()
    return saved
