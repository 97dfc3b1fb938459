"""What ``fxfuse fuse`` writes: the output paths checked before any work, OUT and
OUT.map.json (the map bound to the fused weights) and the JSON report staged in one
:class:`~fxfuse.io.transaction.OutputSet`, and the batch sizes a written dynamic ``.pt2``
is claimed to run at (those verified, plus batch 1 and a large batch checked here)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..api import FuseResult
from ..deploy.onnx import check_onnx_output, is_onnx_path
from ..errors import ConfigError
from ..io.maps import map_metadata
from ..io.saving import SavedModel, non_persistent_keys, render_model
from ..io.writing import check_output_path, resolved
from ..io.transaction import OutputSet
from .console import MAP_NAME, MAP_SUFFIX, dump_json, shown, user_code, warn


def weight_map_path(out: Path) -> Path:
    """OUT.map.json, next to OUT."""
    return out.with_name(out.name + MAP_SUFFIX)


STDOUT = Path("-")            # --report-json -: the report goes to stdout


def output_paths(out: Path, report: Path | None) -> list[Path]:
    """Every file ``fxfuse fuse`` writes: OUT, its map (an .onnx carries its map inside)
    and the report when asked for (not when it goes to stdout)."""
    maps = [] if is_onnx_path(out) else [weight_map_path(out)]
    return [out, *maps] + ([report] if report not in (None, STDOUT) else [])


def write_report(outputs: OutputSet, report: Path, data: dict) -> str | None:
    """Stage the JSON report in ``outputs``; for ``-``, return its text instead (the
    caller prints it once the files are committed)."""
    text = dump_json(data)
    if report == STDOUT:
        return text
    outputs.write(report, text.encode("utf-8"))
    return None


def report_shown(report: Path | None) -> str:
    """`` and the report X`` for the closing line ('' when there is none)."""
    if report is None:
        return ""
    return " and the report on stdout" if report == STDOUT else f" and the report {shown(report)}"


def check_report_path(report_json: str | None, out: Path,
                      inputs: tuple[Path, ...] = ()) -> Path | None:
    """Refuse a bad ``--report-json`` before any work is done (its temp file, made with
    the others, is the writability check)."""
    if not report_json:
        return None
    if report_json == "-":
        return STDOUT
    path = Path(report_json).expanduser().absolute()
    if path.suffix != ".json":
        raise ConfigError(f"--report-json {path} should end in .json")
    taken = {resolved(Path(p)) for p in (*inputs, out, weight_map_path(out))}
    if resolved(path, "--report-json") in taken:
        raise ConfigError(f"--report-json {path} is the output, its weight map or an input "
                          "file; choose another name")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write --report-json {path}: {path.parent} is not an "
                          "existing directory; create it first")
    return path


def read_decisions(decisions: str | None, out: Path, report: Path | None,
                   inputs: tuple[Path, ...] = ()) -> tuple[dict | None, Path | None]:
    """``--decisions FILE``: its recorded decisions when FILE exists (nothing written to
    it), else the path to record this run's decisions into (checked like an output)."""
    if not decisions:
        return None, None
    path = Path(decisions).expanduser().absolute()
    taken = {Path(p).resolve() for p in (*inputs, out, weight_map_path(out),
                                          *([report] if report else []))}
    if path.resolve() in taken:
        raise ConfigError(f"--decisions {path} is the output, its weight map, the report or "
                          "an input file; choose another name")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write --decisions {path}: {path.parent} is not an "
                              "existing directory; create it first")
        return None, path
    from ..check.decisions import Decisions
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --decisions {path}: {exc}") from exc
    return Decisions.from_json(text, source=f"--decisions {path}").to_dict(), None


def check_out(out: str | Path, inputs: tuple[Path, ...] = ()) -> Path:
    """``check_output_path``, or its ONNX counterpart for ``-o x.onnx``."""
    return check_onnx_output(out, inputs) if is_onnx_path(out) else check_output_path(out, inputs)


def _render_out(result: FuseResult, inputs: tuple, out: Path, map_text: str,
                non_persistent: frozenset[str], keep_dims: tuple = ()) -> tuple[bytes, SavedModel]:
    """OUT's bytes, in the format its suffix names (the map rides inside where it can)."""
    extra = None
    if out.suffix.lower() == ".safetensors":
        extra = map_metadata(map_text)
        if not extra:
            warn(f"the weight map ({len(map_text) >> 20} MiB) is too large for the metadata "
                 f"of {out.name}; keep {weight_map_path(out).name} with it")
    elif out.suffix.lower() == ".pt2":
        extra = {MAP_NAME: map_text}
    return render_model(result.model, out, inputs, extra_files=extra,
                        non_persistent=non_persistent, keep_dims=keep_dims)


def write_outputs(result: FuseResult, model: torch.nn.Module, inputs: tuple, out: Path,
                  report_json: Path | None, outputs: OutputSet, keep_dims: tuple = ()
                  ) -> tuple[SavedModel, list[int], str | None]:
    """Write OUT, OUT.map.json and the report to their temps (committed by the caller).
    The map is bound to the fused weights (content hash, shapes, dtypes); a ``.pt2``
    keeps the input program's dynamic dims ``keep_dims`` where the rewrite allows.

    Returns:
        What OUT holds, the batch sizes a dynamic ``.pt2`` was checked at, and the JSON
        report to print on stdout (``--report-json -``; else None).
    """
    non_persistent = non_persistent_keys(model)
    fused_state = {k: v for k, v in result.model.state_dict().items() if k not in non_persistent}
    text = result.weight_map.bind(fused_state).to_json()
    data, saved = _render_out(result, inputs, out, text, non_persistent, keep_dims)
    checked = (_batch_claim(model, saved, result, inputs) if saved.format == "export"
               else _checked_batches(result, inputs))
    outputs.write(out, data)
    outputs.write(weight_map_path(out), text.encode("utf-8"))
    pending = None
    if report_json is not None:
        report = dict(result.to_dict(), output=str(out), weight_map=str(weight_map_path(out)),
                      batch_sizes_checked=checked)
        pending = write_report(outputs, report_json, report)
    return saved, checked, pending


def _checked_batches(result: FuseResult, inputs: tuple) -> list[int]:
    """The batch sizes the fused model was verified at (the verification's own list where
    it gives one, else read from its checks' names)."""
    v = result.verification
    if v is None:
        return []
    given = getattr(v, "batch_sizes", None) or getattr(result, "batch_sizes", None)
    if given:
        return sorted({int(b) for b in given})
    found = {int(m.group(1)) for c in getattr(v, "checks", ())
             for m in [re.search(r"batch (\d+)", str(getattr(c, "name", c)))] if m}
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is not None:
        found.add(int(first.shape[0]))
    return sorted(found)


_CLAIM_TOL = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def _at_batch(inputs: tuple, batch: int) -> tuple:
    """The inputs with ``batch`` rows: fresh random floats (seeded), other rows drawn."""
    gen = torch.Generator().manual_seed(batch)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
        elif x.is_floating_point():
            out.append(torch.randn((batch, *x.shape[1:]), generator=gen).to(x.dtype).to(x.device))
        else:
            out.append(x[torch.randint(0, x.shape[0], (batch,), generator=gen)])
    return tuple(out)


def _program_matches(original: torch.nn.Module, saved: SavedModel, inputs: tuple) -> bool:
    """Whether the written program gives the original model's outputs on ``inputs``."""
    dtype = next((x.dtype for x in inputs if isinstance(x, torch.Tensor)), torch.float32)
    rtol, atol = _CLAIM_TOL.get(dtype, (1e-4, 1e-5))
    try:
        with torch.no_grad(), user_code("checking the batch sizes of the .pt2"):
            want = original(*inputs)
            got = saved.program.module()(*inputs)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    except (Exception, ConfigError):  # noqa: BLE001 - a guard error or a mismatch
        return False
    return True


def _batch_claim(original: torch.nn.Module, saved: SavedModel, result: FuseResult,
                 inputs: tuple) -> list[int]:
    """The batch sizes the written dynamic program was checked at: those the
    verification ran, plus batch 1 and a large batch compared here with the original."""
    checked = set(_checked_batches(result, inputs))
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is None or saved.program is None or not saved.dynamic_batch:
        return sorted(checked)
    for batch in (1, max(2 * int(first.shape[0]) + 1, 9)):
        if batch in checked:
            continue
        if _program_matches(original, saved, _at_batch(inputs, batch)):
            checked.add(batch)
        else:
            warn(f"the written program was not confirmed at batch {batch} (it fails there or "
                 "differs from the original); use it at the verified batch sizes only")
    return sorted(checked)


def describe_saved(saved: SavedModel, checked: list[int] = ()) -> str:
    """What OUT holds and how it may be run, in a few words for the closing line."""
    if saved.format == "export":
        if not saved.dynamic_batch:
            return "torch.export program, runs with the traced shapes only"
        if not checked:
            return "torch.export program with a dynamic batch size (not verified)"
        parities = {b % 2 for b in checked if b > 1}
        if 1 in checked and max(checked) >= 8 and parities == {0, 1}:
            return ("torch.export program, runs with any batch size (checked at "
                    f"{', '.join(map(str, checked))})")
        return ("torch.export program with a dynamic batch size, verified at batch "
                f"{', '.join(map(str, checked))} only")
    if saved.format == "pickle":
        return "pickled GraphModule, load with torch.load(..., weights_only=False)"
    return "the fused model's weights"
