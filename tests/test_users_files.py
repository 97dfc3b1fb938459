"""The files people have: weights from a ``save_pretrained`` directory (one file or
shards), and one TorchScript policy (refused in one line naming the way out) for
``torch.jit.script`` and ``torch.jit.trace`` files alike, as MODEL or as --weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cli_support import (FAST, SHAPE, assert_error, assert_ok, project, reference,  # noqa: F401
                         run_cli, user_code)


def _fuse_with(project, weights: str):
    return run_cli(project, "fuse", "mypkg.model:build", "--weights", weights,
                   "--input-shape", SHAPE, "-o", "out.safetensors", *FAST)


def _fused_matches(project, user_code) -> None:
    from safetensors.torch import load_file
    fused = load_file(str(project / "out.safetensors"))
    ref = reference(user_code).state_dict()
    stacked = torch.cat([ref[f"layers.{i}.weight"] for i in range(5)])
    weight = next(v for k, v in fused.items() if k.endswith("weight"))
    assert torch.equal(weight.reshape(stacked.shape), stacked)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_weights_from_a_save_pretrained_directory(project, user_code, name):
    sd = reference(user_code).state_dict()
    (project / "hf").mkdir()
    (project / "hf" / "config.json").write_text("{}")
    if name.endswith(".safetensors"):
        save_file(sd, str(project / "hf" / name))
    else:
        torch.save(sd, project / "hf" / name)
    assert_ok(_fuse_with(project, "hf"))
    _fused_matches(project, user_code)


def test_weights_from_sharded_save_pretrained(project, user_code):
    sd = reference(user_code).state_dict()
    keys = sorted(sd)
    (project / "hf").mkdir()
    (project / "hf" / "config.json").write_text("{}")
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in halves.items():
        save_file({k: sd[k] for k in names}, str(project / "hf" / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ns in halves.items() for k in ns}}
    (project / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_ok(_fuse_with(project, "hf"))
    _fused_matches(project, user_code)


def test_a_directory_without_weights_is_one_clear_error(project):
    (project / "empty").mkdir()
    assert_error(_fuse_with(project, "empty"), 2, "holds none of", "model.safetensors")


def test_a_missing_shard_is_named(project):
    (project / "hf").mkdir()
    (project / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"layers.0.weight": "model-00001-of-00002.safetensors"}}))
    assert_error(_fuse_with(project, "hf"), 2, "model-00001-of-00002.safetensors")


def _torchscript(project, user_code, how: str) -> str:
    net = reference(user_code)
    x = torch.randn(4, 3, 5, 16)
    script = torch.jit.script(net) if how == "script" else torch.jit.trace(net, (x,))
    path = project / f"{how}.pt"
    torch.jit.save(script, str(path))
    return path.name


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("pickle", [False, True])
def test_torchscript_model_is_refused_the_same_way(project, user_code, how, pickle):
    name = _torchscript(project, user_code, how)
    extra = ("--allow-pickle",) if pickle else ()
    r = run_cli(project, "inspect", name, "--input-shape", SHAPE, *extra)
    assert_error(r, 2, "is a TorchScript file", "cannot be rewritten", "pkg.module:factory",
                 "--weights")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_weights_are_refused_the_same_way(project, user_code, how):
    name = _torchscript(project, user_code, how)
    assert_error(_fuse_with(project, name), 2, "weights", "is a TorchScript file",
                 "model.state_dict()")
