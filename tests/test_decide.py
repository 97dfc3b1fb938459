"""The timing decision (fxfuse.check.decide.choose_among) under a fake, deterministic clock:
no real timing, so every outcome here is the rule's, never the machine's."""
from __future__ import annotations

import json

import pytest
import torch

from fxfuse.check.decide import EARLY_ROUNDS, MARGIN, Choice, choose_among
from helpers import time_kinds_with


class FakeClock:
    """Seconds that pass only when a candidate runs: ``work(costs)`` makes a candidate whose
    n-th call takes ``costs(n)`` fake seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: dict[str, int] = {}

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, costs):
        self.calls[name] = 0

        def call() -> None:
            self.now += costs(self.calls[name])
            self.calls[name] += 1
        return call


def _choose(clock: FakeClock, costs: dict, **kw) -> Choice:
    calls = {name: clock.work(name, cost) for name, cost in costs.items()}
    kw.setdefault("round_s", 0.0)          # one call per round: the counts stay readable
    return choose_among(calls, clock=clock, **kw)


def test_a_rewrite_that_wins_by_the_margin_is_chosen():
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1e-3, "grouped": lambda n: 0.5e-3})
    assert choice.lowering == "grouped"
    assert choice.margin == pytest.approx(2.0) and choice.threshold == MARGIN
    assert choice.settled and choice.rounds == 18          # 9, then 18 agreed
    est = {e.name: e for e in choice.estimates}
    assert est["loop"].estimate_s == pytest.approx(1e-3) and est["loop"].spread_s == 0
    assert dict(choice.timings) == pytest.approx({"loop": 1e-3, "grouped": 0.5e-3})


def test_too_close_keeps_the_loop():
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1.00e-3, "grouped": lambda n: 0.97e-3})
    assert choice.lowering == "loop"
    assert choice.margin == pytest.approx(1 / 0.97) and choice.margin < choice.threshold
    assert "1.03x < 1.05x" in choice.rule()


def test_a_slower_rewrite_keeps_the_loop():
    clock = FakeClock()
    assert _choose(clock, {"loop": lambda n: 1e-3, "bmm": lambda n: 3e-3}).lowering == "loop"


def test_the_minimum_ignores_rounds_slowed_by_other_processes():
    """Every third round of the rewrite is slowed 10x (another process ran): its median
    would be unmoved, but a median over fewer rounds could flip; the minimum is steady."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1e-3 * (5 if n % 2 else 1),
                             "grouped": lambda n: 0.5e-3 * (10 if n % 3 == 0 else 1)})
    assert choice.lowering == "grouped"
    est = {e.name: e for e in choice.estimates}
    assert est["grouped"].estimate_s == pytest.approx(0.5e-3)
    assert est["grouped"].spread_s > 0 and est["loop"].spread_s > 0


def test_a_ranking_that_flips_grows_the_rounds():
    """The loop's first calls are slow (a cold cache, say): on 9 rounds the rewrite looks
    faster, on 18 the loop's true cost shows and the decision flips, so the rounds double
    again until two decisions agree."""
    clock = FakeClock()
    warm = 2 + 1                              # warm-up and calibration calls
    choice = _choose(clock, {"loop": lambda n: 2e-3 if n < warm + 12 else 0.6e-3,
                             "grouped": lambda n: 1e-3})
    assert choice.lowering == "loop"
    assert choice.rounds == 36 and choice.settled


def test_a_spent_budget_stops_and_says_so():
    clock = FakeClock()
    # the rewrite's rounds are noisy (every other one 1.1 s): no clear winner to stop early
    choice = _choose(clock, {"loop": lambda n: 1.0, "grouped": lambda n: 0.5 * (2.2 if n % 2 else 1)},
                     budget_s=5.0)
    assert choice.rounds == 9 and not choice.settled and not choice.early
    assert choice.lowering == "grouped"               # the decision on what was measured
    assert "budget spent" in choice.rule()
    assert clock.now < 5.0 + 9 * 2.1                   # no round started past the budget


def test_near_equal_rewrites_prefer_the_first_listed():
    """Two rewrites within the margin of each other: the first in order wins, so noise
    between them cannot flip the decision from run to run."""
    for second in (0.49e-3, 0.51e-3):
        clock = FakeClock()
        choice = _choose(clock, {"loop": lambda n: 1e-3, "grouped": lambda n: 0.5e-3,
                                 "grouped2d": lambda n, s=second: s})
        assert choice.lowering == "grouped"
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1e-3, "grouped": lambda n: 0.5e-3,
                             "grouped2d": lambda n: 0.3e-3})
    assert choice.lowering == "grouped2d"                # faster by more than the margin


def test_a_choice_round_trips_through_json():
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1e-3, "grouped": lambda n: 0.5e-3})
    data = json.loads(json.dumps(choice.to_dict()))
    assert data["margin"] == pytest.approx(2.0) and data["threshold"] == MARGIN
    assert [e["name"] for e in data["estimates"]] == ["loop", "grouped"]
    assert Choice.from_dict(data) == choice


def test_the_loop_candidate_is_required():
    with pytest.raises(ValueError, match="loop"):
        choose_among({"grouped": lambda: None}, clock=FakeClock())


# ------------------------------------------------------------------ decisions you can keep

def _seed():
    from fxfuse.examples import RowConv1d
    torch.manual_seed(0)
    return RowConv1d(rows=4), torch.randn(2, 15, 4, 12)


def _fake_auto(monkeypatch, costs):
    """auto's timing on a fake clock: each candidate's call costs ``costs[name]`` fake s."""
    import fxfuse.check.auto as auto
    real = choose_among
    clock = FakeClock()

    def fake(calls, **kw):
        kw.update(clock=clock, round_s=0.0)
        timed = {}
        for name, call in calls.items():
            worker = clock.work(name, lambda n, c=costs[name]: c)
            timed[name] = lambda call=call, worker=worker: (call(), worker())
        return real(timed, **kw)

    time_kinds_with(monkeypatch, fake)
    return clock


def test_decisions_are_recorded_and_reused_without_timing(monkeypatch):
    import fxfuse
    import fxfuse.check.auto as auto
    _fake_auto(monkeypatch, {"loop": 1e-3, "grouped": 0.5e-3, "grouped2d": 0.9e-3,
                             "im2col": 0.9e-3})
    model, x = _seed()
    first = fxfuse.fuse(model, x, verify=False, benchmark=False)
    assert first.sites[0].lowering == "grouped"
    text = json.dumps(first.decisions)                       # JSON-serialisable
    (entry,) = json.loads(text)["entries"].values()
    assert entry["lowering"] == "grouped" and entry["key"]["torch"] == torch.__version__
    assert entry["key"]["tensors"][0]["shape"] == [2, 15, 4, 12]
    decision = first.sites[0].decision
    assert decision["margin"] == pytest.approx(2.0) and decision["threshold"] == MARGIN
    assert "min of" in first.report() and "2.00x >= 1.05x" in first.report()

    def no_timing(*a, **k):
        raise AssertionError("timed although a decision was recorded")
    time_kinds_with(monkeypatch, no_timing)
    again = fxfuse.fuse(model, x, verify=False, benchmark=False,
                        decisions=json.loads(text))
    assert again.sites[0].lowering == "grouped" and again.sites[0].decision["reused"]
    assert any("recorded decision" in n for n in again.sites[0].notes)
    assert again.decisions == json.loads(text)


def test_a_decision_for_other_shapes_is_not_reused(monkeypatch):
    import fxfuse
    _fake_auto(monkeypatch, {"loop": 1e-3, "grouped": 0.5e-3, "grouped2d": 0.9e-3,
                             "im2col": 0.9e-3})
    model, x = _seed()
    first = fxfuse.fuse(model, x, verify=False, benchmark=False)
    _fake_auto(monkeypatch, {"loop": 1e-3, "grouped": 2e-3, "grouped2d": 2e-3, "im2col": 2e-3})
    other = fxfuse.fuse(model, torch.randn(2, 15, 4, 20), verify=False, benchmark=False,
                        decisions=first.decisions)
    assert other.sites[0].lowering == "loop" and not other.sites[0].decision["reused"]
    kinds = [e for e in other.decisions["entries"].values()
             if e["key"]["structure"]["loop_kind"] != "rows"]   # the vectorised loop's own
    assert len(kinds) == 2                                      # decision is recorded too


@pytest.mark.parametrize("bad,words", [({"entries": {}}, "not a fxfuse decisions"),
                                       ({"format": "fxfuse-decisions", "version": 9},
                                        "version 9"), ([1, 2], "result.decisions")])
def test_malformed_decisions_are_refused(bad, words):
    import fxfuse
    model, x = _seed()
    with pytest.raises(fxfuse.ConfigError, match=words):
        fxfuse.fuse(model, x, verify=False, benchmark=False, decisions=bad)


def test_a_near_best_rewrite_that_misses_the_margin_keeps_the_loop():
    """The first-listed rewrite is within the margin of the fastest but not clear of the
    loop: the loop is kept (a later rewrite barely faster does not win by a hair)."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 1.00e-3, "grouped": lambda n: 0.97e-3,
                             "grouped2d": lambda n: 0.95e-3})
    assert choice.lowering == "loop"


# ------------------------------------------------------------------ early stop (pass time)

def test_expensive_rounds_stop_early_once_one_candidate_is_clearly_fastest():
    """A loop of thousands of calls (0.2 s a call) against a rewrite 20x faster: after
    three rounds the loop's fastest round is slower than the rewrite's slowest by the
    margin, so the timing stops there instead of growing to 18 rounds."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 0.2, "grouped": lambda n: 0.01})
    assert choice.lowering == "grouped" and choice.early and choice.settled
    assert choice.rounds == EARLY_ROUNDS and choice.retired == ("loop",)
    assert clock.calls["loop"] == 2 + 1 + EARLY_ROUNDS        # warm-up, calibration, rounds
    assert "stopped timing loop early" in choice.rule()
    assert choice.to_dict()["retired"] == ["loop"]
    assert Choice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_a_clearly_fastest_loop_stops_early_too():
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 0.2, "grouped": lambda n: 0.6})
    assert choice.lowering == "loop" and choice.retired == ("grouped",)
    assert choice.rounds == EARLY_ROUNDS


def test_a_beaten_loop_stops_while_near_equal_rewrites_settle():
    """The expensive loop is retired after three rounds; the two near-equal rewrites go on
    being timed until their decision settles (the first listed, within the margin)."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 0.2, "grouped": lambda n: 0.01,
                             "grouped2d": lambda n: 0.0099 * (1.3 if n % 2 else 1)})
    assert choice.lowering == "grouped" and choice.retired == ("loop",)
    assert clock.calls["loop"] == 2 + 1 + EARLY_ROUNDS
    est = {e.name: e for e in choice.estimates}
    assert est["loop"].rounds == EARLY_ROUNDS and est["grouped"].rounds == 18
    assert choice.margin == pytest.approx(20.0)


def test_cheap_rounds_are_never_cut_short():
    """The same 20x, at a millisecond a call: rounds cost little, so they grow until the
    decision settles (the stability rule), with nothing retired."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 2e-3, "grouped": lambda n: 1e-4})
    assert choice.lowering == "grouped" and not choice.early and choice.rounds == 18
    assert "stopped timing" not in choice.rule()


def test_rounds_that_overlap_by_the_margin_do_not_stop_early():
    """An expensive rewrite only 1.1x faster, its rounds noisy: its slowest round is not
    below the loop's fastest by the margin, so the rounds grow as usual."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 0.22, "grouped": lambda n: 0.2 * (1.2 if n % 2 else 1)},
                     budget_s=60.0)
    assert not choice.early and choice.rounds >= 18
    assert choice.lowering == "grouped"                 # 0.22 / 0.2 = 1.1 >= 1.05


def test_a_winner_that_is_clear_only_by_less_than_the_margin_is_timed_on():
    """Clear by 1.03x only (under the margin): no early stop, and the loop is kept."""
    clock = FakeClock()
    choice = _choose(clock, {"loop": lambda n: 0.206, "grouped": lambda n: 0.2}, budget_s=60.0)
    assert not choice.early and choice.lowering == "loop"
