"""``FuseResult.save(path)``: the fused model written from Python as ``fxfuse fuse -o``
writes it: OUT (``.pt2`` with a dynamic batch where the model allows it, ``.pt``/``.pth``
pickled, ``.safetensors`` weights) and ``OUT.map.json``, the map bound to the fused
weights and embedded in OUT where the format can hold it, committed together."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

from ..errors import ConfigError
from .maps import MAP_NAME, map_metadata
from .saving import SavedModel, render_model
from .transaction import OutputSet
from .writing import check_output_path, format_of

MAP_SUFFIX = ".map.json"


def graph_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Random inputs (seeded) with the shapes and dtypes recorded on the graph's inputs."""
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("give example_inputs: the model is not a traced GraphModule")
    gen, out = torch.Generator().manual_seed(0), []
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta") or node.meta.get("val")
        if meta is None or not hasattr(meta, "shape"):
            raise ConfigError(f"give example_inputs: input {node.name!r} has no recorded shape")
        x = torch.randn(tuple(meta.shape), generator=gen)
        out.append(x.to(meta.dtype) if meta.dtype.is_floating_point
                   else torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(out)


def check_picklable(model: torch.nn.Module, out: Path) -> None:
    """Refuse ``-o x.pt`` before any work when the model cannot be pickled at all."""
    class _Sink:
        def write(self, data: bytes) -> int:
            return len(data)
    try:
        pickle.Pickler(_Sink(), protocol=2).dump(model)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot write {str(out)!r}: the model cannot be pickled "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); write "
                          ".pt2 (torch.export) or .safetensors instead") from exc


def save_result(result: Any, path: str | Path,
                example_inputs: Sequence[Any] | None = None) -> SavedModel:
    """Write ``result.model`` to ``path`` and its weight map to ``path + '.map.json'``.

    Args:
        result: a :class:`~fxfuse.FuseResult`.
        path: ``.pt2``, ``.pt``/``.pth`` or ``.safetensors``.
        example_inputs: inputs for ``torch.export`` (``.pt2``); default: random tensors
            of the shapes the model was traced with.

    Returns:
        A :class:`~fxfuse.io.saving.SavedModel` (``dynamic_batch`` says whether a
        ``.pt2`` accepts any batch size).

    Raises:
        ConfigError: bad suffix or path, a model that cannot be pickled to ``.pt``.
        TraceError: ``torch.export`` could not export the model (``.pt2``).
    """
    out = check_output_path(Path(path).expanduser().absolute())
    fmt = format_of(out)
    inputs = tuple(example_inputs) if example_inputs is not None else graph_inputs(result.model)
    state = result.model.state_dict()
    text = result.weight_map.bind(state).to_json()
    sidecar = out.with_name(out.name + MAP_SUFFIX)
    extra = ({MAP_NAME: text} if fmt == "export" else
             map_metadata(text) if fmt == "safetensors" else None)
    with OutputSet([out, sidecar]) as outputs:
        data, saved = render_model(result.model, out, inputs, extra_files=extra)
        outputs.write(out, data)
        outputs.write(sidecar, text.encode("utf-8"))
        outputs.commit()
    return saved
