"""What each ``fxfuse`` subcommand does (the parser lives in :mod:`fxfuse.cli`)."""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..api import fuse
from ..io.checkpoints import first_line
from .console import EXIT_OK, emit, progress, dump_json, shown, user_code, warn
from ..errors import ConfigError, VerificationError
from ..config import FuseConfig
from ..passes.driver import find_sites
from ..io.loading import LoadedModel, load_model, parse_input_shapes, parse_model_kwargs
from ..io.inputs import parse_dtype
from ..io.programs import program_inputs
from .dims import confirm_kept_dims, dims_text, warn_fixed_dims
from ..examples import SEED_SHAPE, seed_model
from ..check.report import site_table
from ..deploy.onnx import is_onnx_path
from ..deploy.onnx_choice import write_onnx
from ..io.writing import atomic_write, check_output_path
from ..io.transaction import OutputSet
from .outputs import (check_out, check_report_path, describe_saved, output_paths,
                      read_decisions, report_shown, weight_map_path, write_outputs,
                      write_report)
from ..trace.tracing import trace_model


def _load(args: argparse.Namespace) -> tuple[LoadedModel, tuple[torch.Tensor, ...]]:
    progress(f"loading {args.model}")
    given = args.input_shape or []
    inputs = parse_input_shapes(given, args.dtype, args.device) if given else None
    if inputs is None and not str(args.model).lower().endswith(".pt2"):
        program_inputs(shown(args.model), None, None, torch.device("cpu"))   # the error
    kwargs = parse_model_kwargs(getattr(args, "model_kwargs", None))
    with user_code("loading the model"):
        loaded = load_model(args.model, weights=args.weights, allow_pickle=args.allow_pickle,
                            device=args.device, dtype=args.dtype, announce=warn,
                            model_kwargs=kwargs)
    if inputs is None:
        inputs = program_inputs(shown(args.model), loaded.shapes,
                                parse_dtype(args.dtype) if args.dtype else None,
                                torch.device(args.device))
        given = [",".join(map(str, x.shape)) for x in inputs]
    args.program_shapes = loaded.shapes      # a .pt2's dynamic dims, kept where they can be
    with user_code("running forward() once"):
        _check_runs(loaded.model, inputs, given)
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
    progress("tracing")
    with user_code("tracing the model"):
        gm = trace_model(loaded.model, inputs, tracer=args.tracer)
        progress("matching loops")
        sites = find_sites(gm, inputs, FuseConfig(min_rows=args.min_rows,
                                                  lowering=getattr(args, "lowering", "auto")))
    if args.json:
        emit(dump_json({"tracer": getattr(gm, "fxfuse_tracer", ""),
                         "sites": [s.to_dict() for s in sites]}))
    else:
        print(site_table(sites))
        fusable = sum(s.fusable for s in sites)
        print(f"\n{fusable} of {len(sites)} loop sites would fuse (nothing was changed)")
    return EXIT_OK


def fuse_command(args: argparse.Namespace) -> int:
    """Fuse, verify, benchmark, print the report, write OUT (+ OUT.map.json)."""
    out = check_out(args.out)
    report = check_report_path(args.report_json, out)
    paths = _all_outputs(args, out, report)
    with OutputSet(paths) as outputs:  # every temp made before any work
        loaded, inputs = _load(args)
        check_out(out, loaded.paths)
        check_report_path(args.report_json, out, loaded.paths)
        _check_pickle_out(args, loaded.model, out)
        return _run_fuse(args, loaded.model, inputs, out, report, outputs)


def _all_outputs(args: argparse.Namespace, out: Path, report: Path | None) -> list[Path]:
    """OUT, its map, the report, and ``--decisions FILE`` when it is to be written (its
    recorded decisions, when it exists, are read now into ``args.decisions_in``)."""
    args.decisions_in, args.decisions_out = read_decisions(
        getattr(args, "decisions", None), out, report)
    if args.decisions_out is not None and is_onnx_path(out):
        warn("--decisions does not apply to an .onnx output (ONNX Runtime times the "
             "exports itself); nothing is recorded")
        args.decisions_out = None
    extra = [args.decisions_out] if args.decisions_out is not None else []
    return output_paths(out, report) + extra


def _check_pickle_out(args: argparse.Namespace, model: torch.nn.Module, out: Path) -> None:
    """``-o x.pt``/``.pth`` is refused before any work when it cannot be written: a model
    that does not pickle, or ``--tracer export`` (its graph holds local functions)."""
    if out.suffix.lower() not in (".pt", ".pth"):
        return
    if args.tracer == "export":
        raise ConfigError(f"cannot write {shown(out)} with --tracer export: a torch.export "
                          "graph cannot be pickled; write .pt2 or .safetensors instead")
    from ..io.save_result import check_picklable
    check_picklable(model, out)


def _run_fuse(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, out: Path,
              report_json: Path | None, outputs: OutputSet) -> int:
    if is_onnx_path(out):
        return _run_fuse_onnx(args, model, inputs, out, report_json, outputs)
    progress("fusing")
    with user_code("fusing the model"):
        result = fuse(model, inputs, lowering=args.lowering, benchmark=not args.no_bench,
                      min_rows=args.min_rows, tracer=args.tracer,
                      check_grads=not args.no_grad_check, rtol=args.rtol, atol=args.atol,
                      decisions=getattr(args, "decisions_in", None))
    print(result.report())
    for warning in result.warnings:
        warn(warning)
    if not result.changed:
        print("no loop was rewritten; writing the traced model unchanged")
    progress(f"writing {shown(out)}")
    with user_code("saving the model"):
        shapes = getattr(args, "program_shapes", None)
        saved, checked, pending = write_outputs(result, model, inputs, out, report_json,
                                                outputs, shapes.dynamic if shapes else ())
        dims = confirm_kept_dims(model, saved, inputs)
    warn_fixed_dims(shown(args.model), shapes, out, saved, inputs)
    decided = getattr(args, "decisions_out", None)
    if decided is not None:
        outputs.write(decided, dump_json(result.decisions).encode("utf-8"))
    signals = outputs.commit()
    if pending is not None:
        emit(pending)
    also = report_shown(report_json)
    if decided is not None:
        also += f", the decisions {shown(decided)}"
    elif getattr(args, "decisions_in", None) is not None:
        print(f"\nreused the decisions recorded in {shown(args.decisions)} (not timed again)")
    print(f"\nwrote {shown(out)} ({describe_saved(saved, checked)}{dims_text(dims)}), its "
          f"weight map {shown(weight_map_path(out))}{also}")
    if signals:
        warn(f"interrupted while the outputs were being moved into place; the move was "
             f"finished: {shown(out)} and its weight map{also} are all the new files")
        return 128 + signals[0]
    return EXIT_OK


def _run_fuse_onnx(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, out: Path,
                   report_json: Path | None, outputs: OutputSet) -> int:
    """``-o x.onnx``: fuse, export, check and time in ONNX Runtime (fxfuse.deploy.onnx);
    the file and the report are committed together like every other output."""
    progress("fusing, exporting to ONNX and checking in ONNX Runtime")
    with tempfile.TemporaryDirectory(prefix="fxfuse-onnx-") as tmp:
        staged = Path(tmp) / out.name
        with user_code("fusing the model"):
            result, fused, onnx_report = write_onnx(
                model, staged, inputs, lowering=args.lowering, benchmark=not args.no_bench,
                min_rows=args.min_rows, tracer=args.tracer, check_grads=not args.no_grad_check,
                rtol=args.rtol, atol=args.atol)
        outputs.write(out, staged.read_bytes())
    print(result.report())
    print(onnx_report.summary().replace(str(staged), str(out)))
    warn_fixed_dims(shown(args.model), getattr(args, "program_shapes", None), out, None, inputs)
    pending = None
    if report_json is not None:
        data = dict(result.to_dict(), output=str(out), fused=fused, onnx=onnx_report.to_dict())
        pending = write_report(outputs, report_json, data)
    signals = outputs.commit()
    if pending is not None:
        emit(pending)
    what = "the fused model" if fused else "the original model (no fused export was faster)"
    also = report_shown(report_json)
    print(f"\nwrote {shown(out)} ({what}, ONNX){also}")
    return 128 + signals[0] if signals else EXIT_OK


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
        out = check_output_path(Path(ns.out).absolute())
        report = check_report_path(ns.report_json, out)
        with OutputSet(_all_outputs(ns, out, report)) as outputs:
            loaded, inputs = _load(ns)
            code = _run_fuse(ns, loaded.model, inputs, out, report, outputs)
        if code != EXIT_OK:
            return code
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
    progress("reloading the .pt2 with torch.export.load")
    reloaded = torch.export.load(str(out)).module()
    x = torch.randn(7, *SEED_SHAPE[1:])
    with torch.no_grad():
        try:
            torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)
        except AssertionError as exc:
            raise VerificationError(f"the reloaded {out.name} differs from the seed model on "
                                    f"batch 7 ({first_line(exc)})") from exc
    print(f"reloaded {out.name} with bare torch.export.load: matches the original on batch 7")
