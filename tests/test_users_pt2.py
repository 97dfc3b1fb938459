"""A ``.pt2`` given as MODEL: its own example inputs stand in for ``--input-shape``; a dim
other than the batch that it accepts at many sizes stays dynamic in the written ``.pt2``
(checked against the original at another size), or is named in one warning when the
rewritten graph cannot keep it."""
from __future__ import annotations

import torch
from torch.export import Dim

from cli_support import (SHAPE, assert_error, assert_ok, project, reference, run_cli,  # noqa: F401
                         user_code)
from trust_support import run_inprocess


def _dynamic_width_program(project, module) -> str:
    net = module.build().eval()
    x = torch.randn(4, 3, 5, 16)
    program = torch.export.export(net, (x,), strict=False, dynamic_shapes=(
        {0: Dim("batch", max=1024), 3: Dim("width", min=8, max=4096)},))
    torch.export.save(program, project / "dyn.pt2")
    return "dyn.pt2"


def test_inspect_a_pt2_without_input_shape(project):
    r = run_cli(project, "inspect", "model.pt2")
    assert_ok(r)
    assert "1 of 1 loop sites would fuse" in r.stdout


def test_fuse_a_pt2_keeps_its_dynamic_width(project, user_code):
    name = _dynamic_width_program(project, user_code[1])
    r = run_cli(project, "fuse", name, "-o", "out.pt2", "--no-bench", "--lowering", "grouped")
    assert_ok(r)
    assert "dynamic in dim 3 of input 'x' (s0, 8..4096) (checked at 16, 17)" in r.stdout \
        or ("dynamic in dim 3 of input 'x'" in r.stdout and "checked at 16, 17" in r.stdout), \
        r.stdout
    fused = torch.export.load(str(project / "out.pt2")).module()
    net = reference(user_code)
    for shape in ((7, 3, 5, 16), (3, 3, 5, 40), (2, 3, 5, 8)):   # batch and width both move
        x = torch.randn(*shape)
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)


def test_a_dim_the_rewrite_cannot_keep_is_named_in_one_warning(project, user_code,
                                                               monkeypatch, capfd):
    import fxfuse.io.saving as saving
    name = _dynamic_width_program(project, user_code[1])

    def refuse(*args, **kwargs):
        raise RuntimeError("the rewritten graph fixes that dim")
    monkeypatch.setattr(saving, "_dim_spec", refuse)
    r = run_inprocess(project, monkeypatch, capfd, "fuse", name, "-o", "out.pt2",
                      "--no-bench", "--lowering", "grouped")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("fxfuse: warning:")]
    assert len(warnings) == 1, r.stderr
    assert "dim 3 of input 'x'" in warnings[0] and "8..4096" in warnings[0] \
        and "fixed at 16" in warnings[0], warnings[0]
    assert "dynamic in dim 3" not in r.stdout
    fused = torch.export.load(str(project / "out.pt2")).module()
    assert fused(torch.randn(7, 3, 5, 16)).shape == (7, 4, 5, 16)   # the batch stays dynamic


def test_a_given_input_shape_still_wins_for_a_pt2(project):
    r = run_cli(project, "inspect", "model.pt2", "--input-shape", "4,3,5,17")
    assert_error(r, 2, "--input-shape 4,3,5,17")


def test_a_factory_without_input_shape_is_one_clear_error(project):
    r = run_cli(project, "inspect", "mypkg.model:build")
    assert_error(r, 2, "give --input-shape for mypkg.model:build")
