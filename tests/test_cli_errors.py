"""Every way the ``fxfuse`` command can be given bad input, run for real.

Each case must end with exactly one ``fxfuse: error:`` line on stderr (no traceback
unless ``--debug``), its own exit code (1: verification refused the rewrite, 2: bad
input or usage) and the project directory exactly as it was: no output, no temp file,
no ``.map.json``, every input byte for byte unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_support import (FAST, SHAPE, assert_error, project, run_cli, user_code)  # noqa: F401
from fxfuse.weightmap import WeightEntry, WeightMap

MODEL = "mypkg.model:build"


def _contents(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in root.rglob("*") if "__pycache__" not in p.parts}


def _fails(project: Path, code: int, *args: str, phrases: tuple[str, ...] = ()) -> str:
    """Run ``fxfuse ARGS``; check the error line and that nothing on disk changed."""
    before = _contents(project)
    line = assert_error(run_cli(project, *args), code, *phrases)
    assert _contents(project) == before
    return line


def _fuse_args(*extra: str, model: str = MODEL, shapes: tuple[str, ...] = (SHAPE,),
               out: str = "fused.pt2") -> list[str]:
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    return ["fuse", model, *shape_args, "-o", out, *FAST, *extra]


def test_missing_model_file(project):
    _fails(project, 2, *_fuse_args(model="missing.pt2"), phrases=("missing.pt2", "does not exist"))


def test_missing_weights_file(project):
    _fails(project, 2, *_fuse_args("--weights", "missing.pt"),
           phrases=("missing.pt", "does not exist"))


@pytest.mark.parametrize("source,keep,role", [
    ("weights.pt", 1000, "weights"),            # truncated zip
    ("weights.safetensors", 100, "weights"),    # truncated header
    ("model.pt2", 5000, "model"),               # truncated archive
    ("weights.pt", 0, "weights"),               # not a checkpoint at all
])
def test_corrupt_or_truncated_checkpoint(project, source, keep, role):
    bad = project / f"bad{Path(source).suffix}"
    bad.write_bytes((project / source).read_bytes()[:keep] if keep else b"not a checkpoint\n")
    args = _fuse_args("--weights", bad.name) if role == "weights" else _fuse_args(model=bad.name)
    _fails(project, 2, *args, phrases=(bad.name, "truncated or corrupt"))


@pytest.mark.parametrize("shapes,cause", [
    (("4,3,5",), "IndexError"),                 # 3-D input for a 4-D model
    (("4,2,5,16",), "channels"),                # wrong channel count
    ((SHAPE, SHAPE), "positional argument"),    # two inputs for a one-input model
])
def test_wrong_number_or_shape_of_inputs(project, shapes, cause):
    _fails(project, 2, *_fuse_args(shapes=shapes), phrases=("does not run on", cause))


def test_inspect_with_a_wrong_shape(project):
    _fails(project, 2, "inspect", MODEL, "--input-shape", "4,3,5", phrases=("does not run on",))


def test_factory_that_raises(project):
    _fails(project, 2, *_fuse_args(model="mypkg.model:broken"),
           phrases=("mypkg.model:broken", "factory exploded"))


def test_debug_shows_the_traceback(project):
    result = run_cli(project, "--debug", *_fuse_args(model="mypkg.model:broken"))
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "factory exploded" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("fxfuse: error: ")


def test_untraceable_model(project):
    _fails(project, 2, *_fuse_args(model="mypkg.model:branchy"),
           phrases=("could not trace", "control flow"))


def test_verification_refuses_a_rewrite_that_changes_the_numbers(project):
    # a grouped convolution sums in another order than 4 separate ones: with no tolerance
    # at all float32's last bits differ, and the rewrite must be refused
    line = _fails(project, 1, *_fuse_args("--rtol", "0", "--atol", "0", model="mypkg.model:wide",
                                          shapes=("4,16,4,32",)),
                  phrases=("refused",))
    assert "max abs error" in line


@pytest.mark.parametrize("args,phrases", [
    (("fuse", MODEL, "--weights", "weights.pt", "-o", "weights.pt"), ("never overwrites",)),
    (("fuse", "model.pt2", "-o", "model.pt2"), ("never overwrites",)),
    (("fuse", "whole.pt", "--allow-pickle", "-o", "whole.pt"), ("never overwrites",)),
    (("fuse", MODEL, "--weights", "weights.safetensors", "-o", "./mypkg/../weights.safetensors"),
     ("never overwrites",)),
    (("fuse", MODEL, "-o", "out.pt2", "--report-json", "out.pt2.map.json"), ("weight map",)),
    (("weights", "map.json", "weights.safetensors", "-o", "weights.safetensors", "--to",
      "fused"), ("never overwrites",)),
    (("weights", "map.json", "weights.pt", "-o", "./weights.pt", "--to", "fused"),
     ("never overwrites",)),
])
def test_output_path_equal_to_an_input(project, args, phrases):
    (project / "map.json").write_text(WeightMap((WeightEntry(
        "layers_fused.weight", tuple(f"layers.{h}.weight" for h in range(5))),)).to_json())
    if args[0] == "fuse":
        args = (*args, "--input-shape", SHAPE, *FAST)
    _fails(project, 2, *args, phrases=phrases)


@pytest.mark.parametrize("out,phrases", [
    ("missing_dir/fused.pt2", ("missing_dir", "does not exist")),
    ("weights.pt/fused.pt2", ("not a directory",)),
    ("fused.tflite", ("unknown suffix", ".pt2")),   # (.onnx is written: test_deploy_onnx)
    ("mypkg", ("unknown suffix",)),
])
def test_bad_output_path(project, out, phrases):
    _fails(project, 2, *_fuse_args(out=out), phrases=phrases)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root may write into a read-only directory")
def test_unwritable_output_directory(project):
    locked = project / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _fails(project, 2, *_fuse_args(out="locked/fused.pt2"), phrases=("not writable",))
    finally:
        locked.chmod(0o755)


def test_report_json_in_a_missing_directory(project):
    _fails(project, 2, *_fuse_args("--report-json", "missing_dir/report.json"),
           phrases=("--report-json",))


@pytest.mark.parametrize("args,phrases", [
    (("fuse", MODEL, "-o", "fused.pt2"), ("give --input-shape", "mypkg.model:build")),
    (("fuse", MODEL, "--input-shape", "4,x,5,16", "-o", "fused.pt2"), ("bad --input-shape",)),
    (("fuse", MODEL, "--input-shape", SHAPE, "-o", "f.pt2", "--min-rows", "0"), ("--min-rows",)),
    (("fuse", MODEL, "--input-shape", SHAPE, "-o", "f.pt2", "--dtype", "int8"), ("dtype",)),
    (("fuse", "mypkg/model.py", "--input-shape", SHAPE, "-o", "f.pt2"), ("name the factory",)),
    (("fuse", "weights.safetensors", "--input-shape", SHAPE, "-o", "f.pt2"), ("--weights",)),
    (("fuse", "mypkg.model:nothing", "--input-shape", SHAPE, "-o", "f.pt2"), ("nothing",)),
    (("fuse", MODEL, "--input-shape", SHAPE, "-o", "f.pt2", "--weights", "whole.pt"),
     ("arbitrary code",)),
    (("nonsense",), ("invalid choice",)),
    (("demo", "--out-dir", "weights.pt"), ("--out-dir",)),
])
def test_usage_errors(project, args, phrases):
    _fails(project, 2, *args, phrases=phrases)


def test_weights_with_a_map_that_is_not_one(project):
    _fails(project, 2, "weights", "weights.safetensors", "weights.pt", "-o", "out.safetensors",
           "--to", "original", phrases=("weight map",))


def test_weights_checkpoint_in_the_wrong_layout(project):
    (project / "map.json").write_text(WeightMap((WeightEntry(
        "layers_fused.weight", tuple(f"layers.{h}.weight" for h in range(5))),)).to_json())
    _fails(project, 2, "weights", "map.json", "weights.safetensors", "-o", "out.safetensors",
           "--to", "original", phrases=("layers_fused.weight",))
    _fails(project, 2, "weights", "map.json", "weights.safetensors", "-o", "out.pt2",
           "--to", "fused", phrases=(".safetensors or .pt",))
