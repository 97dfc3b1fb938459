"""The timing decision (fxfuse.check.decide.choose_among) under a fake, deterministic clock:
no real timing, so every outcome here is the rule's, never the machine's."""
from __future__ import annotations

import json

import pytest

from fxfuse.check.decide import MARGIN, Choice, choose_among


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
    choice = _choose(clock, {"loop": lambda n: 1.0, "grouped": lambda n: 0.5}, budget_s=5.0)
    assert choice.rounds == 9 and not choice.settled
    assert choice.lowering == "grouped"               # the decision on what was measured
    assert "budget spent" in choice.rule()
    assert clock.now < 5.0 + 9 * 1.5                   # no round started past the budget


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
