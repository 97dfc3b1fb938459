"""Weight maps are validated and bound to the checkpoint they were written with.

One real ``fxfuse fuse`` run writes a fused ``.safetensors`` and its map; each case
edits a copy of the map (or pairs it with another checkpoint) and runs
``fxfuse weights`` on the real files: exit 2 and one line, never exit 0 with garbage
and never exit 3.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_support import FAST, SHAPE, reference, user_code  # noqa: F401
from fxfuse.cli.main import main
from fxfuse.errors import ConfigError
from fxfuse.weightmap import WeightMap

MAP = "fused.safetensors.map.json"


@pytest.fixture(scope="module")
def fused_files(user_code, tmp_path_factory):
    """(directory, the map's JSON) after one real fuse to fused.safetensors."""
    root = tmp_path_factory.mktemp("maps")
    shutil.copytree(user_code[0], root, dirs_exist_ok=True)
    import os
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fuse", "mypkg.model:build", "--weights", "weights.safetensors",
                     "--input-shape", SHAPE, "-o", "fused.safetensors", *FAST,
                     "--no-grad-check"]) == 0
    finally:
        os.chdir(here)
    return root, json.loads((root / MAP).read_text())


def _weights(root: Path, map_data: object, checkpoint: str = "fused.safetensors",
             to: str = "original", capfd=None) -> tuple[int, str]:
    """``fxfuse weights`` with ``map_data`` written to a real map file; (exit, stderr)."""
    path = root / "edited.map.json"
    path.write_text(map_data if isinstance(map_data, str) else json.dumps(map_data))
    out = root / "converted.safetensors"
    out.unlink(missing_ok=True)
    code = main(["weights", str(path), str(root / checkpoint), "--to", to, "-o", str(out)])
    err = capfd.readouterr().err if capfd is not None else ""
    if code != 0:
        assert not out.exists()
    return code, err


def _edit(data: dict, fn) -> dict:
    data = json.loads(json.dumps(data))
    fn(data)
    return data


def _nest(depth: int) -> str:
    return '{"format": "fxfuse-weight-map/1", "entries": ' + "[" * depth + "]" * depth + "}"


EDITS = {
    "part removed": lambda d: d["entries"][0]["parts"].pop(),
    "op changed": lambda d: d["entries"][0].update(op="stack"),
    "split dim changed": lambda d: d["entries"][0].update(dim=1),
    "parts a string": lambda d: d["entries"][0].update(parts="layers.0.weight"),
    "empty parts": lambda d: d["entries"][0].update(parts=[]),
    "dim out of range": lambda d: d["entries"][0].update(dim=10 ** 9),
    "dim a list": lambda d: d["entries"][0].update(dim=[[[0]]]),
    "unknown op": lambda d: d["entries"][0].update(op="__import__"),
    "duplicate fused_key": lambda d: d["entries"][1].update(
        fused_key=d["entries"][0]["fused_key"]),
    "overlapping parts": lambda d: d["entries"][1]["parts"].__setitem__(
        0, d["entries"][0]["parts"][0]),
    "fused key is a part": lambda d: d["entries"][1]["parts"].__setitem__(
        0, d["entries"][0]["fused_key"]),
    "entries not a list": lambda d: d.update(entries={"a": 1}),
    "entry not an object": lambda d: d["entries"].__setitem__(0, "x"),
    "binding malformed": lambda d: d.update(binding={"fused_sha256": 3}),
    "parts swapped": lambda d: d["entries"][0]["parts"].reverse(),
    "no format": lambda d: d.pop("format"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_edited_map_is_refused(fused_files, capfd, name):
    root, data = fused_files
    code, err = _weights(root, _edit(data, EDITS[name]), capfd=capfd)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fxfuse: error:"), (name, err)


@pytest.mark.parametrize("text", [_nest(100_000), "[]", "null", '"map"', "{" * 50, ""],
                         ids=["deep-nesting", "list", "null", "string", "broken", "empty"])
def test_malformed_map_json_is_one_line(fused_files, capfd, text):
    root, _ = fused_files
    code, err = _weights(root, text, capfd=capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_map_of_another_model_is_refused(fused_files, capfd, user_code):
    root, data = fused_files
    other = {k: torch.randn(2, *v.shape[1:]) if v.dim() else v
             for k, v in load_file(str(root / "fused.safetensors")).items()}
    save_file(other, str(root / "other.safetensors"))
    code, err = _weights(root, data, "other.safetensors", capfd=capfd)
    assert code == 2 and "does not belong to this checkpoint" in err


def test_map_from_another_run_is_refused_by_the_map_inside_the_checkpoint(fused_files, capfd):
    """Same layout, different weights, map written with other weights: a mixed pair."""
    root, data = fused_files
    tensors = load_file(str(root / "fused.safetensors"))
    from safetensors import safe_open
    with safe_open(str(root / "fused.safetensors"), "pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["fxfuse_weight_map.json"])
    inner["binding"]["fused_sha256"] = "0" * 64        # as written by another run
    save_file(tensors, str(root / "mixed.safetensors"),
              metadata={"fxfuse_weight_map.json": json.dumps(inner)})
    code, err = _weights(root, data, "mixed.safetensors", capfd=capfd)
    assert code == 2 and "map stored inside it" in err


def test_original_checkpoint_with_other_shapes_is_refused_going_to_fused(fused_files, capfd):
    root, data = fused_files
    state = load_file(str(root / "weights.safetensors"))
    first = data["entries"][0]["parts"][0]
    state[first] = torch.randn(7, 7)
    save_file(state, str(root / "wrong_original.safetensors"))
    code, err = _weights(root, data, "wrong_original.safetensors", to="fused", capfd=capfd)
    assert code == 2 and first in err


def test_good_map_round_trips_exactly(fused_files, capfd, user_code):
    root, data = fused_files
    code, err = _weights(root, data, capfd=capfd)
    assert code == 0, err
    back = load_file(str(root / "converted.safetensors"))
    net = reference(user_code)
    net.load_state_dict(back, strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, back[key])


def test_fine_tuned_weights_of_the_same_layout_still_convert(fused_files, capfd):
    root, data = fused_files
    tuned = {k: v + 0.5 for k, v in load_file(str(root / "fused.safetensors")).items()}
    save_file(tuned, str(root / "tuned.safetensors"))
    code, err = _weights(root, data, "tuned.safetensors", capfd=capfd)
    assert code == 0, err


def test_map_bound_in_the_api(fused_files):
    root, data = fused_files
    wmap = WeightMap.from_json(json.dumps(data))
    fused = load_file(str(root / "fused.safetensors"))
    assert wmap.check_fused(fused) == "exact"
    fused[data["entries"][0]["fused_key"]] = fused[data["entries"][0]["fused_key"]].double()
    with pytest.raises(ConfigError, match="float64"):
        wmap.check_fused(fused)
