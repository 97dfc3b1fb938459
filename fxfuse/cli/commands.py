"""What each ``fxfuse`` subcommand does (the parser lives in :mod:`fxfuse.cli`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..api import FuseResult, fuse
from ..io.checkpoints import read_weights, existing_file, first_line
from .main import EXIT_OK, MAP_NAME, MAP_SUFFIX, _progress, dump_json
from ..errors import ConfigError, VerificationError
from ..match.find import find_row_sites
from ..io.loading import LoadedModel, load_model, parse_input_shapes
from ..examples import SEED_SHAPE, seed_model
from ..check.report import site_table
from ..deploy.onnx import check_onnx_output, is_onnx_path, write_onnx
from ..io.saving import SavedModel, atomic_write, check_output_path, save_model, write_sidecar
from ..trace.tracing import trace_model
from ..rewrite.weights import WeightMap

WEIGHT_SUFFIXES = (".safetensors", ".pt")


def _load(args: argparse.Namespace) -> tuple[LoadedModel, tuple[torch.Tensor, ...]]:
    _progress(f"loading {args.model}")
    loaded = load_model(args.model, weights=args.weights, allow_pickle=args.allow_pickle,
                        device=args.device, dtype=args.dtype)
    inputs = parse_input_shapes(args.input_shape, args.dtype, args.device)
    _check_runs(loaded.model, inputs, args.input_shape)
    return loaded, inputs


def _check_runs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                shapes: list[str]) -> None:
    """Run the model once, so a wrong number or shape of inputs fails here, in plain words
    (a traced graph silently drops extra inputs)."""
    given = " ".join(f"--input-shape {s}" for s in shapes)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
        raise ConfigError(f"the model does not run on {given} ({first_line(exc)}); give one "
                          "--input-shape per forward() argument, with the sizes it expects") \
            from exc


def inspect(args: argparse.Namespace) -> int:
    """Dry run: list every loop site, its rows and conv, and whether it would fuse."""
    loaded, inputs = _load(args)
    _progress("tracing")
    gm = trace_model(loaded.model, inputs, tracer=args.tracer)
    sites = find_row_sites(gm, min_rows=args.min_rows)
    if args.json:
        print(dump_json({"tracer": getattr(gm, "fxfuse_tracer", ""),
                         "sites": [s.to_dict() for s in sites]}))
    else:
        print(site_table(sites))
        fusable = sum(s.fusable for s in sites)
        print(f"\n{fusable} of {len(sites)} loop sites would fuse (nothing was changed)")
    return EXIT_OK


def fuse_command(args: argparse.Namespace) -> int:
    """Fuse, verify, benchmark, print the report, write OUT (+ OUT.map.json)."""
    out = _check_out(args.out)
    _check_report_path(args.report_json, out)
    loaded, inputs = _load(args)
    _check_out(out, loaded.paths)
    report = _check_report_path(args.report_json, out, loaded.paths)
    _run_fuse(args, loaded.model, inputs, out, report)
    return EXIT_OK


def _map_path(out: Path) -> Path:
    return out.with_name(out.name + MAP_SUFFIX)


def _check_report_path(report_json: str | None, out: Path,
                       inputs: tuple[Path, ...] = ()) -> Path | None:
    """Refuse a bad ``--report-json`` before any work is done."""
    if not report_json:
        return None
    path = Path(report_json).expanduser()
    if path.suffix != ".json":
        raise ConfigError(f"--report-json {path} should end in .json")
    taken = {Path(p).resolve() for p in (*inputs, out, _map_path(out))}
    if path.resolve() in taken:
        raise ConfigError(f"--report-json {path} is the output, its weight map or an input "
                          "file; choose another name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write --report-json {path}: {path.parent} is missing or "
                          "not writable")
    return path


def _check_out(out: str | Path, inputs: tuple[Path, ...] = ()) -> Path:
    """``check_output_path``, or its ONNX counterpart for ``-o x.onnx``."""
    return check_onnx_output(out, inputs) if is_onnx_path(out) else check_output_path(out, inputs)


def _run_fuse(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, out: Path,
              report_json: Path | None) -> None:
    if is_onnx_path(out):
        return _run_fuse_onnx(args, model, inputs, out, report_json)
    _progress("tracing, matching, rewriting and verifying")
    result = fuse(model, inputs, lowering=args.lowering, benchmark=not args.no_bench,
                  min_rows=args.min_rows, tracer=args.tracer,
                  check_grads=not args.no_grad_check, rtol=args.rtol, atol=args.atol)
    print(result.report())
    if not result.changed:
        print("no loop was rewritten; writing the traced model unchanged")
    _progress(f"writing {out}")
    saved = _write_outputs(result, inputs, out, report_json)
    also = f" and the report {report_json}" if report_json is not None else ""
    print(f"\nwrote {out} ({_describe(saved)}), its weight map {_map_path(out)}{also}")


def _run_fuse_onnx(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, out: Path,
                   report_json: Path | None) -> None:
    """``-o x.onnx``: fuse, export, check and time in ONNX Runtime (fxfuse.deploy.onnx)."""
    _progress("fusing, exporting to ONNX and checking in ONNX Runtime")
    result, fused, onnx_report = write_onnx(
        model, out, inputs, lowering=args.lowering, benchmark=not args.no_bench,
        min_rows=args.min_rows, tracer=args.tracer, check_grads=not args.no_grad_check,
        rtol=args.rtol, atol=args.atol)
    print(result.report())
    print(onnx_report.summary())
    if report_json is not None:
        data = dict(result.to_dict(), output=str(out), fused=fused, onnx=onnx_report.to_dict())
        try:
            atomic_write(report_json, lambda p: p.write_text(dump_json(data)))
        except BaseException:
            with contextlib.suppress(OSError):
                out.unlink()
            raise
    what = "the fused model" if fused else "the original model (no fused export was faster)"
    print(f"\nwrote {out} ({what}, ONNX)" + (f" and the report {report_json}"
                                                if report_json is not None else ""))


def _write_outputs(result: FuseResult, inputs: tuple, out: Path,
                   report_json: Path | None) -> SavedModel:
    """OUT, then OUT.map.json, then the report; after any failure none of them is left."""
    text = result.weight_map.to_json()
    written: list[Path] = []
    try:
        extra = {MAP_NAME: text} if out.suffix != ".pt" else None
        saved = save_model(result.model, out, inputs, extra_files=extra)
        written.append(out)
        written.append(write_sidecar(out, MAP_SUFFIX, text))
        if report_json is not None:
            data = dict(result.to_dict(), output=str(out), weight_map=str(written[-1]))
            written.append(atomic_write(report_json, lambda p: p.write_text(dump_json(data))))
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return saved


def _describe(saved: SavedModel) -> str:
    if saved.format == "export":
        batch = "any batch size" if saved.dynamic_batch else "the traced shapes only"
        return f"torch.export program, runs with {batch}"
    if saved.format == "pickle":
        return "pickled GraphModule, load with torch.load(..., weights_only=False)"
    return "the fused model's weights"


def demo(args: argparse.Namespace) -> int:
    """The seed model end to end through the saved-model path: save, load, fuse, reload."""
    with _demo_dir(args.out_dir) as root:
        from safetensors.torch import save_file
        checkpoint = root / "seed_rowconv.safetensors"
        model = seed_model()
        atomic_write(checkpoint, lambda p: save_file(model.state_dict(), str(p)))
        shape = ",".join(map(str, SEED_SHAPE))
        print(f"seed model: 10 rows x Conv1d(15, 15, 3) on x[:, :, h, :], input ({shape})")
        print(f"saved its weights to {checkpoint}\n")
        ns = argparse.Namespace(**dict(
            vars(args), model="fxfuse.examples:seed_model", weights=str(checkpoint),
            allow_pickle=False, device="cpu", dtype=None, input_shape=[shape], min_rows=2,
            tracer="auto", out=str(root / "seed_rowconv_fused.pt2")))
        out = check_output_path(ns.out)
        report = _check_report_path(ns.report_json, out)
        loaded, inputs = _load(ns)
        _run_fuse(ns, loaded.model, inputs, out, report)
        _check_reloaded(out, model)
        if args.out_dir is None:
            print("(the files were in a temporary directory, now removed; pass --out-dir "
                  "DIR to keep them)")
    return EXIT_OK


@contextlib.contextmanager
def _demo_dir(out_dir: str | None) -> Iterator[Path]:
    """``--out-dir`` (created if needed), or a temporary directory removed afterwards."""
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="fxfuse-demo-") as tmp:
            yield Path(tmp)
        return
    root = Path(out_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use --out-dir {root} ({first_line(exc)}); give a "
                          "directory that exists or can be created") from exc
    yield root


def _check_reloaded(out: Path, model: torch.nn.Module) -> None:
    """Load the written .pt2 with bare torch and compare it with the model on batch 7."""
    _progress("reloading the .pt2 with torch.export.load")
    reloaded = torch.export.load(str(out)).module()
    x = torch.randn(7, *SEED_SHAPE[1:])
    with torch.no_grad():
        try:
            torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)
        except AssertionError as exc:
            raise VerificationError(f"the reloaded {out.name} differs from the seed model on "
                                    f"batch 7 ({first_line(exc)})") from exc
    print(f"reloaded {out.name} with bare torch.export.load: matches the original on batch 7")


def convert_weights(args: argparse.Namespace) -> int:
    """Convert a state_dict between the looped and the fused layout, exactly."""
    map_path = existing_file(args.map, "weight map")
    wmap, map_text = _read_map(map_path)
    source = existing_file(args.checkpoint, "checkpoint")
    out = _check_weights_out(args.out, [source, map_path])
    state = read_weights(source, False)
    converted = wmap.to_original(state) if args.to == "original" else wmap.to_fused(state)
    if out.suffix.lower() == ".safetensors":
        # the fused layout carries its map, as 'fxfuse fuse' writes it: same bytes
        _save_safetensors(converted, out, {MAP_NAME: map_text} if args.to == "fused" else None)
    else:
        atomic_write(out, lambda p: torch.save(converted, p))
    print(f"wrote {out}: {len(converted)} tensors in the {args.to} layout")
    return EXIT_OK


def _read_map(path: Path) -> tuple[WeightMap, str]:
    """The map in ``path`` and its text, verbatim."""
    try:
        text = path.read_text(encoding="utf-8")
        return WeightMap.from_json(text), text
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"cannot read weight map {str(path)!r} ({first_line(exc)}); give "
                          "the OUT.map.json written by 'fxfuse fuse'") from exc


def _check_weights_out(out: str, inputs: list[Path]) -> Path:
    path = Path(out).expanduser()
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(f"cannot write weights to {str(path)!r}: name it .safetensors or .pt")
    return check_output_path(path, inputs)


def _save_safetensors(state: dict, out: Path, metadata: dict[str, str] | None) -> None:
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"checkpoint entry {bad!r} is a {type(state[bad]).__name__}, which "
                          ".safetensors cannot hold; write a .pt instead")
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in state.items()}
    from safetensors.torch import save_file
    atomic_write(out, lambda p: save_file(tensors, str(p), metadata=metadata))
