"""What fxfuse does where the installed torch lacks a capability (``fxfuse/compat.py``).

Each stand-in is tested under every torch: under the newest by taking the capability away,
under the floor (``.ci/floor`` runs this file there too) as it is. The quiet import and the
muted deprecation warnings are tested in ``test_cli_habits.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxfuse import compat
from fxfuse.io.saving import render_model
from fxfuse.trace.export import FixedModeError, fix_mode, keep_input_checks
from zoo import spellings


def test_named_batch_dims_stand_in_for_dim_auto(monkeypatch):
    monkeypatch.setattr(compat, "HAS_DIM_AUTO", False)
    batch = compat.BatchDims()
    a, b, c = torch.zeros(4, 3), torch.zeros(4, 5), torch.zeros(6, 3)
    assert batch(a) is batch(b) and batch(c) is not batch(a)
    model = spellings.Seed()
    x = model.example()
    saved = render_model(model, "out.pt2", (x,))[1]
    assert saved.dynamic_batch
    other = torch.randn(x.shape[0] + 3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(saved.program.module()(other), model(other))


def test_fixed_mode_reaches_copies_without_deepcopy_hooks():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    gm._register_deepcopy_hook = None     # as on torch 2.6 and older
    fix_mode(gm, training=True)
    twin = copy.deepcopy(gm)
    twin.train()
    with pytest.raises(FixedModeError, match="train mode only"):
        twin.eval()


def test_static_input_dims_are_kept_in_the_graph():
    model = spellings.Seed().eval()
    x = model.example()
    gm = torch.export.export(model, (x,), strict=False).module()
    for node in [n for n in gm.graph.nodes if n.target == "_guards_fn"]:
        gm.graph.erase_node(node)          # as on torch 2.6 and older: the check is a hook
    gm.recompile()
    assert keep_input_checks(gm) == 1
    twin = copy.deepcopy(gm)               # copies and re-traces drop the hook
    twin._forward_pre_hooks.clear()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        with pytest.raises(Exception, match="must have size"):
            twin(torch.randn(x.shape[0] + 1, *x.shape[1:]))
