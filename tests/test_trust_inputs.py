"""Hostile and careless inputs: .pt2 archives that would run code or blow up memory,
pickles passed as weights, checkpoints of the wrong kind, impossible shapes and devices.

Every archive is a real ``torch.export.save`` output with entries added or changed; every
payload would touch a marker file, and each test checks the marker never appears.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_support import SHAPE, assert_error, project, run_cli, user_code  # noqa: F401
from fxfuse.errors import ConfigError
from fxfuse.io.loading import load_model, parse_input_shapes
from trust_support import (config_with_pickle, raw_payload, read_entry, rebuild,
                           torch_payload)

W_CONFIG = "data/weights/model_weights_config.json"
C_CONFIG = "data/constants/model_constants_config.json"


def _evil(project: Path, name: str, marker: Path) -> Path:
    """The project's model.pt2 turned hostile in the way ``name`` says."""
    src, dst = project / "model.pt2", project / f"{name}.pt2"
    payload = torch_payload(marker)
    if name == "sample_inputs":
        return rebuild(src, dst, {"data/sample_inputs/model.pt": payload})
    if name == "weight_use_pickle":
        fqn = next(iter(json.loads(read_entry(src, W_CONFIG))["config"]))
        return rebuild(src, dst, {W_CONFIG: config_with_pickle(src, W_CONFIG, fqn, "weight_0"),
                                  "data/weights/weight_0": payload})
    if name == "constant_use_pickle":
        return rebuild(src, dst, {C_CONFIG: config_with_pickle(src, C_CONFIG, None, "tensor_0")},
                       {"data/constants/tensor_0": payload})
    if name == "opaque_object":
        cfg = json.loads(read_entry(src, C_CONFIG))
        cfg["config"]["opaque"] = {"path_name": "opaque_obj_0", "is_param": False,
                                   "use_pickle": False, "tensor_meta": None}
        return rebuild(src, dst, {C_CONFIG: json.dumps(cfg).encode()},
                       {"data/constants/opaque_obj_0": raw_payload(marker)})
    if name == "aotinductor":
        flags = {"compiler": f"touch {marker}; true", "sources": [], "output": "x.so"}
        return rebuild(src, dst, add={
            "data/aotinductor/model/model.wrapper.cpp": b"int main() { return 0; }\n",
            "data/aotinductor/model/model.wrapper_metadata.json": b"{\"AOTI_DEVICE_KEY\": \"cpu\"}",
            "data/aotinductor/model/model.wrapper_compile_flags.json": json.dumps(flags).encode()})
    if name == "legacy_pickled_weights":
        return rebuild(src, dst, add={"data/weights/model.pt": payload})
    raise AssertionError(name)


HOSTILE = [("sample_inputs", "data/sample_inputs/model.pt"),
           ("weight_use_pickle", "use_pickle"),
           ("constant_use_pickle", "use_pickle"),
           ("opaque_object", "opaque_obj_0"),
           ("aotinductor", "data/aotinductor/"),
           ("legacy_pickled_weights", "data/weights/model.pt")]


def test_the_sample_inputs_payload_is_live(project, tmp_path):
    """Control: bare torch.export.load does run the payload (so the refusals below matter)."""
    marker = tmp_path / "ran"
    evil = _evil(project, "sample_inputs", marker)
    with pytest.raises(Exception):
        torch.export.load(str(evil))
    assert marker.exists()


@pytest.mark.parametrize("name,phrase", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_archive_is_refused_before_torch_reads_it(project, tmp_path, name, phrase):
    marker = tmp_path / "ran"
    evil = _evil(project, name, marker)
    with pytest.raises(ConfigError, match="--allow-pickle") as info:
        load_model(str(evil))
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_aotinductor_archive_through_the_command_runs_nothing(project, tmp_path):
    marker, tmp = tmp_path / "ran", tmp_path / "tmpdir"
    tmp.mkdir()
    evil = _evil(project, "aotinductor", marker)
    result = run_cli(project, "inspect", evil.name, "--input-shape", SHAPE,
                     env={**os.environ, "TMPDIR": str(tmp)})
    assert_error(result, 2, "data/aotinductor/", "--allow-pickle")
    assert not marker.exists()
    leftovers = [p for root in (project, tmp) for p in root.rglob("aotinductor_*")]
    assert leftovers == []


def test_allow_pickle_says_what_will_run_before_it_runs(project, tmp_path):
    marker = tmp_path / "ran"
    evil = _evil(project, "sample_inputs", marker)
    result = run_cli(project, "inspect", evil.name, "--input-shape", SHAPE, "--allow-pickle")
    warning = [l for l in result.stderr.splitlines() if l.startswith("fxfuse: warning:")]
    assert len(warning) == 1 and "data/sample_inputs/model.pt" in warning[0], result.stderr
    assert marker.exists()  # it was allowed, and it said so first


@pytest.mark.parametrize("entry", ["data/weights/weight_0", "extra/blob"])
def test_zip_bomb_entry_is_refused_without_inflating_it(project, entry):
    src = project / "model.pt2"
    zeros = bytes(64 << 20)  # 64 MiB of zeros, a few KiB deflated
    bomb = rebuild(src, project / "bomb.pt2", {entry: zeros}, deflate=(entry,))
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(ConfigError, match="zip bomb") as info:
        load_model(str(bomb))
    assert entry in str(info.value)


def test_duplicate_entry_is_refused(project):
    src = project / "model.pt2"
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile allows it, warning
        dup = rebuild(src, project / "dup.pt2", add={"models/model.json": b"{}"})
    with pytest.raises(ConfigError, match="appears twice"):
        load_model(str(dup))


def test_plain_archive_still_loads_and_runs(project):
    loaded = load_model(str(project / "model.pt2"))
    assert loaded.runs == () and loaded.model(torch.randn(4, 3, 5, 16)).shape == (4, 4, 5, 16)


def test_raw_pickle_weights_are_called_a_pickle(project):
    state = torch.load(project / "weights.pt", weights_only=True)
    import pickle
    (project / "raw.pt").write_bytes(pickle.dumps(dict(state)))
    line = assert_error(run_cli(project, "inspect", "mypkg.model:build", "--input-shape",
                                SHAPE, "--weights", "raw.pt"), 2, "pickle", "--allow-pickle")
    assert "truncated" not in line


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
def test_complex_or_bool_checkpoint_into_float_parameters_is_refused(project, dtype):
    state = torch.load(project / "weights.pt", weights_only=True)
    state = {k: v.to(dtype) for k, v in state.items()}
    torch.save(state, project / "odd.pt")
    with pytest.raises(ConfigError, match="casting would change its values") as info:
        load_model("mypkg.model:build", weights=str(project / "odd.pt"))
    assert str(dtype).removeprefix("torch.") in str(info.value)


@pytest.mark.parametrize("shape,phrase", [("9223372036854775808,2", "int64"),
                                          ("4294967296,4294967296", "int64"),
                                          ("1099511627776,1099511627776,4", "int64")])
def test_input_shape_beyond_int64(shape, phrase):
    with pytest.raises(ConfigError, match=phrase):
        parse_input_shapes([shape])


def test_input_shape_too_large_for_memory_is_one_line(project):
    assert_error(run_cli(project, "inspect", "mypkg.model:build", "--input-shape",
                         "1099511627776,1024,4"), 2, "input")


def test_device_meta_is_refused(project):
    assert_error(run_cli(project, "inspect", "mypkg.model:build", "--input-shape", SHAPE,
                         "--device", "meta"), 2, "meta", "cpu")
