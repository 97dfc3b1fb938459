"""``fxfuse weights``: convert a checkpoint between the looped and the fused layout,
exactly, after checking the map is well formed and belongs to the checkpoint (the map
read from OUT.map.json, or from inside a fused .pt2/.safetensors)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.checkpoints import existing_file, first_line, read_weights
from ..io.maps import map_from_metadata, map_metadata, read_map_text
from ..io.transaction import OutputSet
from ..io.writing import check_output_path
from ..weightmap import WeightMap
from .console import EXIT_OK, shown, warn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def convert_weights(args: argparse.Namespace) -> int:
    """Convert a state_dict between the looped and the fused layout, exactly, after
    checking the map is well formed and belongs to the checkpoint."""
    map_path = existing_file(args.map, "weight map")
    wmap, map_text = _read_map(map_path)
    source = existing_file(args.checkpoint, "checkpoint")
    out = _check_weights_out(args.out, [source, map_path])
    with OutputSet([out]) as outputs:
        state = _read_checkpoint(source, args)
        match = _check_direction(source, wmap, state, args.to)
        converted = wmap.to_original(state) if args.to == "original" else wmap.to_fused(state)
        if out.suffix.lower() == ".safetensors":
            # the fused layout carries its map, as 'fxfuse fuse' writes it: same bytes
            data = _safetensors_bytes(converted, map_metadata(map_text) if args.to == "fused"
                                      else None)
        else:
            buffer = io.BytesIO()
            torch.save(converted, buffer)
            data = buffer.getvalue()
        outputs.write(out, data)
        outputs.commit()
    how = ("the very weights the map was written with" if match == "exact" else
           "shapes and dtypes match the map")
    print(f"wrote {shown(out)}: {len(converted)} tensors in the {args.to} layout ({how})")
    return EXIT_OK


def _check_direction(source: Path, wmap: WeightMap, state: dict, to: str) -> str:
    """Check ``state`` is in the layout ``--to`` converts from; when it is in the other
    one, say which ``--to`` fits. Returns "exact" or "layout"."""
    try:
        if to == "original":
            _check_embedded_map(source, wmap)
            return wmap.check_fused(state)
        wmap.check_original(state)
        return "layout"
    except ConfigError as exc:
        other = "fused" if to == "original" else "original"
        try:   # already in the layout asked for?
            wmap.check_original(state) if to == "original" else wmap.check_fused(state)
        except ConfigError:
            raise exc from None
        why = str(exc).splitlines()[0][:160]
        raise ConfigError(f"{str(source)!r} is already in the {to} layout, so there is "
                          f"nothing to convert with --to {to} ({why}); to convert it to the "
                          f"{other} layout, use --to {other}") from exc


def _read_checkpoint(source: Path, args: argparse.Namespace) -> dict:
    """The state_dict in ``source``: a weights file, or the weights of a fused ``.pt2``."""
    allow = bool(getattr(args, "allow_pickle", False))
    if source.suffix.lower() != ".pt2":
        return dict(read_weights(source, allow))
    from ..io.checkpoints import load_export
    module, _, _ = load_export(source, allow, warn)
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _check_embedded_map(source: Path, wmap: WeightMap) -> None:
    """Refuse a map other than the one 'fxfuse fuse' stored inside ``source`` (a
    .safetensors written by it carries its map in the metadata)."""
    if source.suffix.lower() != ".safetensors" or wmap.binding is None:
        return
    from safetensors import safe_open
    try:
        with safe_open(str(source), "pt") as handle:
            text = map_from_metadata(handle.metadata())
        inner = WeightMap.from_json(text) if text else None
    except (OSError, ConfigError, RuntimeError, ValueError):
        return  # no usable map inside: the layout check decides
    if inner is not None and inner.binding is not None and \
            inner.binding.get("fused_sha256") != wmap.binding.get("fused_sha256"):
        raise ConfigError(f"the weight map does not belong to {str(source)!r}: the map stored "
                          "inside it was written with other weights; use the OUT.map.json "
                          "written with this checkpoint")


def _read_map(path: Path) -> tuple[WeightMap, str]:
    """The map in ``path`` (validated) and its text, verbatim."""
    try:
        text = read_map_text(path)
        return WeightMap.from_json(text), text
    except (OSError, ConfigError) as exc:
        raise ConfigError(f"cannot use weight map {str(path)!r}: "
                          f"{str(exc) if isinstance(exc, ConfigError) else first_line(exc)}"
                          ) from exc


def _check_weights_out(out: str, inputs: list[Path]) -> Path:
    path = Path(out).expanduser().absolute()
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(f"cannot write weights to {str(path)!r}: name it .safetensors or .pt (or .pth)")
    return check_output_path(path, inputs)


def _safetensors_bytes(state: dict, metadata: dict[str, str] | None) -> bytes:
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"checkpoint entry {bad!r} is a {type(state[bad]).__name__}, which "
                          ".safetensors cannot hold; write a .pt instead")
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in state.items()}
    from safetensors.torch import save
    return save(tensors, metadata=metadata)
