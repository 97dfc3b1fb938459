"""Outputs on another device than the original's are refused with a clear reason.

A model that fills a buffer allocated without ``device=`` returns a CPU tensor even for
inputs on a GPU (``copy_`` crosses devices); its rewrite would return the input's device.
No GPU is needed: the fused output is moved to ``meta`` to stand for "another device".
"""
from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.check.compare import compare


def test_compare_refuses_an_output_on_another_device():
    ref = torch.randn(2, 3)
    with pytest.raises(fxfuse.VerificationError, match="on cpu in the original and on meta"):
        compare("example inputs", ref, ref.to("meta"))


def test_compare_same_device_still_compares():
    ref = torch.randn(2, 3)
    assert compare("example inputs", ref, ref.clone()).max_abs == 0.0
