"""The files and factories people have (issue 20): a factory with required arguments
(--model-kwargs), a Lightning .ckpt (state_dict inside, keys under 'model.'), a common
key prefix that does not strip cleanly, and the wrong --to direction."""
from __future__ import annotations

import argparse

import torch

from cli_support import FAST, SHAPE, assert_error, project, user_code  # noqa: F401
from trust_support import run_inprocess

FACTORY = '''
from mypkg.model import RowNet


def sized(rows, channels=3):
    return RowNet(channels=channels, rows=rows)
'''


def test_model_kwargs_reach_the_factory(project, monkeypatch, capfd):
    (project / "sized.py").write_text(FACTORY)
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "sized.py:sized",
                      "--input-shape", "2,3,7,16", "--model-kwargs", '{"rows": 7}')
    assert r.returncode == 0, r.stderr
    assert "7" in r.stdout and "1 of 1 loop sites would fuse" in r.stdout


def test_a_factory_with_required_arguments_names_model_kwargs(project, monkeypatch, capfd):
    (project / "sized.py").write_text(FACTORY)
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "sized.py:sized",
                      "--input-shape", SHAPE)
    assert_error(r, 2, "missing 1 required positional argument", "--model-kwargs")


def test_model_kwargs_that_are_not_an_object_are_one_line(project, monkeypatch, capfd):
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "mypkg.model:build",
                      "--input-shape", SHAPE, "--model-kwargs", "[1, 2]")
    assert_error(r, 2, "--model-kwargs must be a JSON object")


def _lightning(project, sd: dict) -> None:
    torch.save({"epoch": 3, "global_step": 10, "state_dict": sd,
                "hyper_parameters": {"lr": 0.1}, "optimizer_states": []},
               project / "last.ckpt")


def test_a_lightning_ckpt_loads_with_its_model_prefix_stripped(project, monkeypatch, capfd):
    sd = torch.load(project / "weights.pt", weights_only=True)
    _lightning(project, {f"model.{k}": v for k, v in sd.items()})
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build", "--weights",
                      "last.ckpt", "--input-shape", SHAPE, "-o", "out.safetensors", *FAST)
    assert r.returncode == 0, r.stderr
    r = run_inprocess(project, monkeypatch, capfd, "weights", "out.safetensors.map.json",
                      "out.safetensors", "-o", "back.pt", "--to", "original")
    back = torch.load(project / "back.pt", weights_only=True)
    for key, value in sd.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_a_prefix_that_does_not_strip_cleanly_is_named(project, monkeypatch, capfd):
    sd = torch.load(project / "weights.pt", weights_only=True)
    sd.pop(next(iter(sd)))
    torch.save({f"net.{k}": v for k, v in sd.items()}, project / "prefixed.pt")
    r = run_inprocess(project, monkeypatch, capfd, "inspect", "mypkg.model:build", "--weights",
                      "prefixed.pt", "--input-shape", SHAPE)
    assert_error(r, 2, "every key in the file starts with 'net.'")


def test_a_pickled_lightning_ckpt_advises_allow_pickle(project, monkeypatch, capfd):
    sd = torch.load(project / "weights.pt", weights_only=True)
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=0.1)}, project / "p.ckpt")
    args = ["inspect", "mypkg.model:build", "--weights", "p.ckpt", "--input-shape", SHAPE]
    assert_error(run_inprocess(project, monkeypatch, capfd, *args), 2, "--allow-pickle")
    assert run_inprocess(project, monkeypatch, capfd, *args, "--allow-pickle").returncode == 0


def test_the_wrong_to_direction_names_the_right_one(project, monkeypatch, capfd):
    r = run_inprocess(project, monkeypatch, capfd, "fuse", "mypkg.model:build", "--weights",
                      "weights.pt", "--input-shape", SHAPE, "-o", "out.safetensors", *FAST)
    assert r.returncode == 0, r.stderr
    r = run_inprocess(project, monkeypatch, capfd, "weights", "out.safetensors.map.json",
                      "weights.pt", "-o", "x.pt", "--to", "original")
    assert_error(r, 2, "already in the original layout", "--to fused")
    r = run_inprocess(project, monkeypatch, capfd, "weights", "out.safetensors.map.json",
                      "out.safetensors", "-o", "x.pt", "--to", "fused")
    assert_error(r, 2, "already in the fused layout", "--to original")
