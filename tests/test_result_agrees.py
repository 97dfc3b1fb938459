"""A result that agrees with itself: a fused model measured slower than the original
beyond the spread is said so (log warning, report row, JSON), and no ``fused time`` row
appears when nothing was fused. The benchmark is replaced by fixed figures: no timing."""
from __future__ import annotations

import logging

import torch

import fxfuse
import fxfuse.api as api
from fxfuse.check.bench import BenchResult, Timing
from fxfuse.examples import RowConv1d


def _bench(speedup: float, q1: float, q3: float):
    def fake(original, fused, inputs, **kw):
        t = Timing(1e-3, 0.9e-3, 1.1e-3, 15)
        f = Timing(1e-3 / speedup, 0.9e-3 / speedup, 1.1e-3 / speedup, 15)
        return BenchResult(t, f, speedup, q1, q3, {"threads": 1})
    return fake


def _model():
    torch.manual_seed(0)
    return RowConv1d(rows=4), torch.randn(2, 15, 4, 12)


def test_a_fused_model_measured_slower_is_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(api, "benchmark_models", _bench(0.8, 0.7, 0.9))
    model, x = _model()
    with caplog.at_level(logging.WARNING, logger="fxfuse"):
        result = fxfuse.fuse(model, x, lowering="grouped", verify=False)
    (warning,) = result.warnings
    assert "slower than the original" in warning and "keep the original" in warning
    assert warning in caplog.text
    assert "warning" in result.report() and "0.80x" in result.report()
    assert result.to_dict()["warnings"] == [warning]


def test_a_slowdown_within_the_spread_is_not_a_warning(monkeypatch):
    monkeypatch.setattr(api, "benchmark_models", _bench(0.95, 0.8, 1.1))
    model, x = _model()
    result = fxfuse.fuse(model, x, lowering="grouped", verify=False)
    assert result.warnings == () and "warning" not in result.report()


def test_no_fused_time_row_when_nothing_was_fused(monkeypatch):
    monkeypatch.setattr(api, "benchmark_models", _bench(0.5, 0.4, 0.6))
    model, x = _model()
    result = fxfuse.fuse(model, x, lowering="grouped", verify=False, min_rows=99)
    assert not result.changed
    report = result.report()
    assert "fused time" not in report and "original time" in report
    assert "nothing was fused" in report and result.warnings == ()
