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


# ------------------------------------------------------------ sites that do not hold up

class _Timings:
    """A fake benchmark giving the speedups listed, one per call, and a fake clock for
    auto whose rewrite wins the first decision and, when ``holds`` is False, loses the
    ones after it (the site's rewrite does not hold up when timed again)."""

    def __init__(self, monkeypatch, speedups, holds: bool):
        from helpers import FakeAutoClock, time_kinds_with
        self.speedups, self.bench_calls, self.decisions = list(speedups), 0, 0
        self.wins, self.loses = FakeAutoClock(), FakeAutoClock(1e-3, 2e-3)
        self.holds = holds
        monkeypatch.setattr(api, "benchmark_models", self.bench)
        time_kinds_with(monkeypatch, self.choose)

    def bench(self, original, fused, inputs, **kw):
        speedup = self.speedups[min(self.bench_calls, len(self.speedups) - 1)]
        self.bench_calls += 1
        return _bench(speedup, speedup * 0.9, min(speedup * 1.1, 0.99 if speedup < 0.9 else 2))(
            original, fused, inputs)

    def choose(self, calls, **kw):
        self.decisions += 1
        clock = self.wins if self.decisions == 1 or self.holds else self.loses
        return clock.choose_among(calls, **kw)


def test_a_site_that_does_not_hold_up_gets_its_loop_back(monkeypatch):
    timings = _Timings(monkeypatch, [0.8, 1.0], holds=False)
    model, x = _model()
    result = fxfuse.fuse(model, x)
    assert timings.decisions == 2 and timings.bench_calls == 2   # timed again, re-benchmarked
    (site,) = result.sites
    assert site.lowering == "loop" and not result.changed
    assert any("reverted to the loop" in n and "0.80x" in n for n in site.notes)
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)
    other = torch.randn(5, 15, 4, 12)
    torch.testing.assert_close(result.model(other), model(other), rtol=0, atol=0)
    assert result.warnings == () and "fused time" not in result.report()
    assert result.to_dict()["sites"][0]["lowering"] == "loop"


def test_a_site_that_holds_up_is_kept_and_the_slowdown_still_warned(monkeypatch):
    """Timed again, the rewrite still wins: the pass gives the same model back; both
    end-to-end timings are slower, so the one-line warning stays."""
    timings = _Timings(monkeypatch, [0.8, 0.7], holds=True)
    model, x = _model()
    result = fxfuse.fuse(model, x)
    assert timings.decisions == 2 and timings.bench_calls == 2
    assert result.sites[0].fused
    (warning,) = result.warnings
    assert "0.80x" in warning and "keep the original" in warning     # the better of the two


def test_a_forced_lowering_is_not_second_guessed(monkeypatch):
    timings = _Timings(monkeypatch, [0.8], holds=False)
    model, x = _model()
    result = fxfuse.fuse(model, x, lowering="grouped", verify=False)
    assert timings.bench_calls == 1 and result.sites[0].lowering == "grouped"
    assert result.warnings


def test_a_reverted_pass_starts_from_a_fresh_copy_of_the_model(monkeypatch):
    """The first rewrite drops the summed Linears' own weights from the working modules;
    the second pass (after the end-to-end benchmark found the model slower) must trace a
    fresh copy, not the modules the first rewrite changed."""
    from test_trust_sums import SharedSum
    _Timings(monkeypatch, [0.8, 1.0], holds=False)
    model, x = SharedSum(n=2).eval(), torch.randn(6, 4, 12)
    result = fxfuse.fuse(model, x)
    assert not result.changed and not any(s.fused for s in result.sites)
    assert any("reverted" in n for s in result.sites for n in s.notes), result.sites
    other = torch.randn(7, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other), rtol=0, atol=0)
