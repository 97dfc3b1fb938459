"""What each ``fxfuse`` subcommand does (the parser lives in :mod:`fxfuse.cli`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .api import fuse
from .cli import EXIT_OK, MAP_NAME, MAP_SUFFIX, _progress, dump_json
from .errors import ConfigError
from .find import find_row_sites
from .loading import load_model, parse_input_shapes
from .models import SEED_SHAPE, seed_model
from .report import site_table
from .saving import atomic_write, check_output_path, save_model, write_sidecar
from .tracing import trace_model
from .weights import WeightMap


def _load(args: argparse.Namespace):
    _progress(f"loading {args.model}")
    loaded = load_model(args.model, weights=args.weights, allow_pickle=args.allow_pickle,
                        device=args.device, dtype=args.dtype)
    inputs = parse_input_shapes(args.input_shape, args.dtype, args.device)
    return loaded, inputs


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
    out = check_output_path(args.out)
    report_json = _check_report_path(args, [])
    loaded, inputs = _load(args)
    check_output_path(out, loaded.paths)
    _check_report_path(args, loaded.paths)
    _run_fuse(args, loaded.model, inputs, out, report_json)
    return EXIT_OK


def _check_report_path(args: argparse.Namespace, inputs) -> Path | None:
    """Refuse a bad ``--report-json`` before any work is done."""
    if not args.report_json:
        return None
    path = Path(args.report_json).expanduser()
    taken = {Path(p).resolve() for p in inputs} | {Path(args.out).expanduser().resolve()}
    if path.suffix != ".json":
        raise ConfigError(f"--report-json {path} should end in .json")
    if path.resolve() in taken:
        raise ConfigError(f"--report-json {path} is the output or an input file; choose another name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write --report-json {path}: {path.parent} is missing or not writable")
    return path


def _run_fuse(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, out: Path,
              report_json: Path | None) -> None:
    _progress("tracing, matching, rewriting and verifying")
    result = fuse(model, inputs, lowering=args.lowering, benchmark=not args.no_bench,
                  min_rows=getattr(args, "min_rows", 2), tracer=getattr(args, "tracer", "auto"),
                  check_grads=not args.no_grad_check, rtol=args.rtol, atol=args.atol)
    print(result.report())
    if not result.changed:
        print("no loop was rewritten; writing the traced model unchanged")
    _progress(f"writing {out}")
    text = result.weight_map.to_json()
    map_path = write_sidecar(out, MAP_SUFFIX, text)
    try:
        extra = {MAP_NAME: text} if out.suffix != ".pt" else None
        saved = save_model(result.model, out, inputs, extra_files=extra)
    except BaseException:
        with contextlib.suppress(OSError):
            map_path.unlink()
        raise
    if report_json is not None:
        data = dict(result.to_dict(), output=str(out), weight_map=str(map_path))
        atomic_write(report_json, lambda p: p.write_text(dump_json(data)))
    batch = "any batch size" if saved.dynamic_batch else "the traced shapes"
    print(f"\nwrote {out} ({saved.format}, runs with {batch}) and {map_path}")


def demo(args: argparse.Namespace) -> int:
    """The seed model end to end through the saved-model path: save, load, fuse, reload."""
    root = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="fxfuse-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    checkpoint = root / "seed_rowconv.safetensors"
    model = seed_model()
    atomic_write(checkpoint, lambda p: save_file(model.state_dict(), str(p)))
    shape = ",".join(map(str, SEED_SHAPE))
    print(f"seed model: 10 rows x Conv1d(15, 15, 3) on x[:, :, h, :], input ({shape})")
    print(f"saved its weights to {checkpoint}\n")
    fields = {k: v for k, v in vars(args).items() if k != "report_json"}
    ns = argparse.Namespace(**fields, model="fxfuse.models:seed_model",
                            weights=str(checkpoint), allow_pickle=False, device="cpu",
                            dtype=None, input_shape=[shape], min_rows=2, tracer="auto",
                            report_json=args.report_json and str(root / args.report_json),
                            out=str(root / "seed_rowconv_fused.pt2"))
    out = check_output_path(ns.out)
    loaded, inputs = _load(ns)
    _run_fuse(ns, loaded.model, inputs, out, _check_report_path(ns, []))
    _progress("reloading the .pt2 with torch.export.load")
    reloaded = torch.export.load(str(out)).module()
    x = torch.randn(7, *SEED_SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)
    print(f"reloaded {out.name} with bare torch.export.load: matches the original on batch 7")
    return EXIT_OK


def convert_weights(args: argparse.Namespace) -> int:
    """Convert a state_dict between the looped and the fused layout, exactly."""
    from .checkpoints import _read_weights as read_state_dict, existing_file
    wmap = WeightMap.load(existing_file(args.map, "weight map"))
    source = existing_file(args.checkpoint, "checkpoint")
    out = check_output_path(args.out, [source, Path(args.map)])
    state = read_state_dict(source, False)
    converted = wmap.to_original(state) if args.to == "original" else wmap.to_fused(state)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in converted.items()}
        atomic_write(out, lambda p: save_file(tensors, str(p)))
    else:
        atomic_write(out, lambda p: torch.save(converted, p))
    print(f"wrote {out}: {len(converted)} tensors in the {args.to} layout")
    return EXIT_OK

