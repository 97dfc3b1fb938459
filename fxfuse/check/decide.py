"""Decide among timed candidates so that the decision holds on a busy machine.

Each candidate is a zero-argument callable; ``"loop"`` is the one that is kept unless
another beats it. The candidates are warmed up, then timed in many short interleaved
rounds (A, B, C, B, C, A, ...). A candidate's cost estimate is the *minimum* over its
rounds: another process can only ever add time to a round, so the minimum of many short
rounds is the figure least moved by contention (the median moves with the load).

The rounds are doubled until the decision made on all rounds so far is the same as the
one made on half of them (it has *settled*), or until the time budget is spent. Where
rounds are expensive (the slowest candidate's estimate at least ``EARLY_CALL_S`` a call:
a loop of thousands of calls), a candidate *clearly beaten* stops being timed, after at
least ``EARLY_ROUNDS`` rounds: its fastest round is slower, by the margin, than another
candidate's slowest round. The rounds go on among the others (a 4096-call loop beaten 5x
is not timed again while two near-equal rewrites settle), and end when one is left.
Cheap rounds are never cut short (growing them costs little, and it is what keeps a
decision from flipping on a few slow rounds).

The rule: the rewrite put forward is the first in the order given unless a later one is
faster by ``threshold`` (so two near-equal rewrites do not flip between runs), and it
replaces the loop only when the loop's estimate is at least ``threshold`` times its own
(a margin, so ties go to the loop).
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

log = logging.getLogger("fxfuse")

LOOP = "loop"
# A rewrite must be estimated this many times faster than the loop before it is chosen.
MARGIN = 1.05
# Seconds of timing one decision may take (warm-up and calibration included).
BUDGET_S = 4.0
# Target seconds per candidate per round: short rounds, so some fall between the
# time slices other processes take.
ROUND_S = 0.002
MAX_ROUNDS = 512
# Rounds before a clearly beaten candidate stops being timed, and the estimated seconds
# per call of the slowest candidate from which rounds count as costly (see the module
# docstring). The minimum, unlike elapsed time, is not inflated by a busy machine.
EARLY_ROUNDS = 3
EARLY_CALL_S = 0.02

Clock = Callable[[], float]


def real_clock() -> float:
    """``time.perf_counter()``, after waiting for queued CUDA work when CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class Estimate:
    """One candidate's timing: the cost estimate (minimum seconds per call over the
    rounds) and, for the spread, the quartiles of its rounds."""

    name: str
    estimate_s: float
    q1_s: float
    median_s: float
    q3_s: float
    rounds: int

    @property
    def spread_s(self) -> float:
        """Interquartile range of the rounds, seconds per call."""
        return self.q3_s - self.q1_s

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "estimate_s": self.estimate_s, "q1_s": self.q1_s,
                "median_s": self.median_s, "q3_s": self.q3_s, "spread_s": self.spread_s,
                "rounds": self.rounds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Estimate":
        return cls(str(data["name"]), float(data["estimate_s"]), float(data["q1_s"]),
                   float(data["median_s"]), float(data["q3_s"]), int(data["rounds"]))


@dataclass(frozen=True)
class Choice:
    """What ``auto`` decided for one site.

    Attributes:
        lowering: ``"loop"`` (keep it) or a lowering name.
        timings: (candidate, estimated seconds per call) for the loop and each rewrite.
        note: why the loop was kept without timing, or that a recorded decision was
            reused (``""`` otherwise).
        estimates: per candidate, the estimate and the spread of its rounds.
        margin: the loop's estimate over the rewrite put forward (the first listed within
            ``threshold`` of the fastest); 0.0 when not timed.
        threshold: the margin a rewrite needed to be chosen.
        rounds: interleaved rounds the decision was made on.
        settled: the decision on all rounds equals the one on half of them, or every
            other candidate was clearly beaten (False: the time budget ran out first).
        retired: the candidates no longer timed once clearly beaten (their fastest round
            slower, by the margin, than another's slowest; only where rounds are costly).
        reused: the decision was read from recorded decisions, not measured.
    """

    lowering: str
    timings: tuple[tuple[str, float], ...] = ()
    note: str = ""
    estimates: tuple[Estimate, ...] = ()
    margin: float = 0.0
    threshold: float = MARGIN
    rounds: int = 0
    settled: bool = True
    reused: bool = False
    retired: tuple[str, ...] = ()

    @property
    def early(self) -> bool:
        """Some candidates stopped being timed early, clearly beaten."""
        return bool(self.retired)

    @property
    def timed(self) -> bool:
        return bool(self.estimates)

    def rule(self) -> str:
        """The decision in one line: estimates, spread, margin against the threshold."""
        if not self.timed:
            return f"{self.lowering} ({self.note or 'not timed'})"
        parts = ", ".join(f"{e.name} {e.estimate_s * 1e3:.3f} ms (IQR "
                          f"{e.spread_s * 1e3:.3f})" for e in self.estimates)
        verdict = (f"{self.lowering}: loop/{self.lowering} {self.margin:.2f}x >= "
                   f"{self.threshold:.2f}x" if self.lowering != LOOP else
                   f"loop: the best rewrite {self.margin:.2f}x < {self.threshold:.2f}x")
        how = f"min of {self.rounds} interleaved rounds" + \
            ("" if self.settled else ", time budget spent before the decision settled") + \
            (f", stopped timing {', '.join(self.retired)} early: its fastest round slower "
             f"than another's slowest by {self.threshold:.2f}x" if self.early else "")
        return f"{verdict} ({how}; {parts})" + (" [recorded decision]" if self.reused else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the decision, each candidate's estimate and spread, the rule."""
        return {"lowering": self.lowering, "timed": self.timed, "note": self.note,
                "estimates": [e.to_dict() for e in self.estimates], "margin": self.margin,
                "threshold": self.threshold, "rounds": self.rounds, "settled": self.settled,
                "reused": self.reused, "retired": list(self.retired),
                "statistic": "min of interleaved rounds",
                "rule": self.rule()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Choice":
        estimates = tuple(Estimate.from_dict(e) for e in data.get("estimates", ()))
        return cls(str(data["lowering"]), tuple((e.name, e.estimate_s) for e in estimates),
                   str(data.get("note", "")), estimates, float(data.get("margin", 0.0)),
                   float(data.get("threshold", MARGIN)), int(data.get("rounds", 0)),
                   bool(data.get("settled", True)), bool(data.get("reused", False)),
                   tuple(str(r) for r in data.get("retired", ())))


def choose_among(calls: Mapping[str, Callable[[], Any]], *, rounds: int = 9,
                 clock: Clock | None = None, threshold: float = MARGIN,
                 budget_s: float = BUDGET_S, round_s: float = ROUND_S,
                 warmup: int = 2) -> Choice:
    """Time ``calls`` interleaved and decide; the loop is kept unless clearly beaten.

    Args:
        calls: candidate name -> zero-argument callable; must hold ``"loop"``. The order
            is the order of preference among rewrites that clear the margin.
        rounds: the rounds of the first decision; doubled until the decision settles.
        clock: seconds now (default :func:`real_clock`); tests pass a fake one.
        threshold: the loop's estimate over a rewrite's that the rewrite must reach.
        budget_s: seconds (on ``clock``) after which no more rounds are started.
        round_s: target seconds per candidate per round (sets the calls per round).
        warmup: untimed calls per candidate first.

    Returns:
        A :class:`Choice` with every candidate's estimate and spread, the margin, the
        threshold, the rounds, whether the decision settled and which candidates
        stopped being timed early.
    """
    if LOOP not in calls:
        raise ValueError(f"choose_among needs a {LOOP!r} candidate, got {sorted(calls)}")
    now = clock or real_clock
    start = now()
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    numbers = {k: _calls_per_round(fn, now, round_s) for k, fn in calls.items()}
    state = _Rounds(calls, numbers, now, threshold)
    previous, settled, target = None, False, max(1, rounds)
    while True:
        begun, done = now(), state.count
        state.run(target - done)
        decision = _decide(state.samples, threshold)
        if len(state.active) == 1 or previous is not None and decision[0] == previous:
            settled = True
            break
        previous = decision[0]
        per_round = (now() - begun) / max(1, target - done)
        if target >= MAX_ROUNDS or (now() - start) + per_round * target > budget_s:
            break
        target *= 2
    return _choice(state.samples, decision, threshold, settled, state.retired)


def _calls_per_round(fn: Callable[[], Any], now: Clock, round_s: float) -> int:
    """How many calls make one round of about ``round_s`` seconds (at least one)."""
    t0 = now()
    fn()
    once = now() - t0
    return max(1, min(10_000, int(round_s / once))) if once > 0 else 1


class _Rounds:
    """The interleaved rounds so far: each round times every active candidate once, in
    rotating order. Where rounds are costly (see :data:`EARLY_CALL_S`), a candidate
    clearly beaten stops being timed (it is *retired*, its estimate kept)."""

    def __init__(self, calls: Mapping[str, Callable[[], Any]], numbers: Mapping[str, int],
                 now: Clock, threshold: float) -> None:
        self.calls, self.numbers, self.now = calls, numbers, now
        self.threshold = threshold
        self.samples: dict[str, list[float]] = {k: [] for k in calls}
        self.active = list(calls)
        self.retired: tuple[str, ...] = ()
        self.count = 0

    def run(self, count: int) -> None:
        """``count`` more rounds (fewer when all but one candidate are retired)."""
        for _ in range(count):
            if len(self.active) == 1:
                return
            shift = self.count % len(self.active)
            for name in self.active[shift:] + self.active[:shift]:
                fn, number = self.calls[name], self.numbers[name]
                t0 = self.now()
                for _ in range(number):
                    fn()
                self.samples[name].append((self.now() - t0) / number)
            self.count += 1
            if max(min(v) for v in self.samples.values() if v) >= EARLY_CALL_S:
                self._retire()

    def _retire(self) -> None:
        beaten = clearly_beaten({k: self.samples[k] for k in self.active}, self.threshold)
        if beaten:
            self.active = [k for k in self.active if k not in beaten]
            self.retired += beaten


def clearly_beaten(samples: Mapping[str, Sequence[float]], threshold: float
                   ) -> tuple[str, ...]:
    """The candidates whose fastest round is slower, by ``threshold``, than another
    candidate's slowest round, once each has :data:`EARLY_ROUNDS` rounds. More rounds
    can only lower that other candidate's estimate, so such a candidate cannot become
    the choice (a loop beaten so stays beaten; a rewrite so slow is never put forward)."""
    if len(samples) < 2 or min(len(v) for v in samples.values()) < EARLY_ROUNDS:
        return ()
    slowest = {k: max(v) * threshold for k, v in samples.items()}
    return tuple(k for k, v in samples.items()
                 if any(slowest[o] <= min(v) for o in samples if o != k))


def _decide(samples: Mapping[str, Sequence[float]], threshold: float) -> tuple[str, float]:
    """The decision on ``samples``: (candidate, loop estimate / its estimate).

    The rewrite put forward is the first in order whose estimate is within ``threshold``
    of the fastest rewrite's (so near-equal rewrites do not flip from run to run); it
    replaces the loop only when it beats the loop by ``threshold``.
    """
    est = {k: min(v) for k, v in samples.items()}
    rewrites = [k for k in samples if k != LOOP]
    if not rewrites:
        return LOOP, 0.0
    best = min(est[k] for k in rewrites)
    pick = next(k for k in rewrites if est[k] <= best * threshold)
    ratio = est[LOOP] / est[pick] if est[pick] > 0 else float("inf")
    return (pick if ratio >= threshold else LOOP), ratio


def _choice(samples: Mapping[str, Sequence[float]], decision: tuple[str, float],
            threshold: float, settled: bool, retired: tuple[str, ...] = ()) -> Choice:
    estimates = tuple(_estimate(k, v) for k, v in samples.items())
    choice = Choice(decision[0], tuple((e.name, e.estimate_s) for e in estimates), "",
                    estimates, decision[1], threshold, max(map(len, samples.values())),
                    settled, retired=retired)
    log.info("auto: %s", choice.rule())
    return choice


def _estimate(name: str, values: Sequence[float]) -> Estimate:
    values = list(values)
    if len(values) < 2:
        return Estimate(name, values[0], values[0], values[0], values[0], len(values))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Estimate(name, min(values), q1, statistics.median(values), q3, len(values))


def untimed(note: str) -> Choice:
    """The loop, kept without timing, with why."""
    return Choice(LOOP, (), note)


def reused(choice: Choice, note: str = "reused a recorded decision (not timed again)") -> Choice:
    """``choice`` marked as read from recorded decisions."""
    return replace(choice, note=note, reused=True)


__all__ = ["BUDGET_S", "Choice", "EARLY_CALL_S", "EARLY_ROUNDS", "Estimate", "LOOP", "MARGIN", "choose_among",
           "clearly_beaten", "real_clock", "untimed", "reused"]
