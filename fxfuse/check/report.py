"""Tables for people: the sites found, the numerical check, the timing."""
from __future__ import annotations

from typing import Sequence

from tabulate import tabulate

from .bench import BenchResult
from ..match.sites import RowSite
from .verify import VerifyReport


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def site_table(sites: Sequence[RowSite]) -> str:
    """One line per loop: where, how it was written, rows, conv, what the pass did."""
    if not sites:
        return "no per-row Conv1d loop found"
    rows = []
    for s in sites:
        if s.fused:
            outcome = s.lowering
        elif s.lowering == "loop":
            outcome = "kept loop (fastest)" if s.timings else "kept loop (not timed)"
        elif s.fusable:
            outcome = "would fuse"
        else:
            outcome = f"left alone: {s.reason}"
        timing = ", ".join(f"{k} {_ms(v)}" for k, v in s.timings)
        rows.append([s.name, s.where(), s.loop_kind or s.combine_kind, s.rows,
                     s.spec.describe() if s.spec else "-", outcome, timing or "-"])
    return tabulate(rows, headers=["site", "where", "loop", "rows", "conv", "result",
                                   "candidate times"], tablefmt="simple")


def decision_lines(sites: Sequence[RowSite]) -> list[str]:
    """One line per site ``auto`` decided: each candidate's estimate and spread, the
    margin against the threshold, the rounds (the rule, in the decision's own words)."""
    return [f"decision {s.name}: {s.decision['rule']}" for s in sites
            if s.decision is not None and s.decision.get("rule")]


def _error_rows(verification: VerifyReport) -> list[list[str]]:
    """The worst absolute and relative error, for outputs and for gradients apart."""
    rows = []
    for label, part in (("outputs", [c for c in verification.checks if "grad" not in c.name]),
                        ("gradients", [c for c in verification.checks if "grad" in c.name])):
        if part:
            rows.append([f"max error, {label}",
                         f"abs {max(c.max_abs for c in part):.3g}, rel "
                         f"{max(c.max_rel for c in part):.3g} (of the largest value)"])
    return rows


def _batch_row(verification: VerifyReport) -> list[list[str]]:
    """The batch sizes checked, and those the program refuses, if any were checked."""
    if not verification.batch_sizes:
        return []
    refused = (f" (the program refuses {', '.join(map(str, verification.batch_refused))})"
               if verification.batch_refused else "")
    return [["batch sizes checked", ", ".join(map(str, verification.batch_sizes)) + refused]]


def _verification_rows(verification: VerifyReport | None) -> list[list[str]]:
    """Errors, checks run, precision, batch sizes, modes and what was skipped."""
    if verification is None:
        return [["verification", "not run"]]
    rows = _error_rows(verification)
    rows.append(["checks", ", ".join(c.name for c in verification.checks)])
    if verification.precision:
        rows.append(["precision", verification.precision])
    rows += [["precision note", n] for n in verification.notes]
    rows += _batch_row(verification)
    if verification.modes:
        rows.append(["modes checked", ", ".join(verification.modes)])
    rows += [["skipped", s] for s in verification.skipped]
    return rows


def _timing_rows(timing: BenchResult | None, fused: bool = True) -> list[list[str]]:
    """Original and fused median time with their IQR, and the speedup (only the
    original's time when nothing was fused: the two would be one model)."""
    if timing is None:
        return [["timing", "not run"]]
    if not fused:
        return [["original time", f"{_ms(timing.original.median_s)} "
                 f"(IQR {_ms(timing.original.q1_s)}–{_ms(timing.original.q3_s)})"],
                ["speedup", "none: nothing was fused"]]
    rows = [["original time", f"{_ms(timing.original.median_s)} "
             f"(IQR {_ms(timing.original.q1_s)}–{_ms(timing.original.q3_s)})"],
            ["fused time", f"{_ms(timing.fused.median_s)} "
             f"(IQR {_ms(timing.fused.q1_s)}–{_ms(timing.fused.q3_s)})"],
            ["speedup", f"{timing.speedup:.2f}x (IQR {timing.speedup_q1:.2f}–"
             f"{timing.speedup_q3:.2f}x, {timing.original.rounds} interleaved rounds)"]]
    warning = slower_warning(timing)
    return rows + ([["warning", warning]] if warning else [])


def slower_warning(timing: BenchResult | None) -> str:
    """One line when the fused model measured slower than the original beyond the
    spread (the speedup's upper quartile below 1); ``""`` otherwise."""
    if timing is None or timing.speedup_q3 >= 1.0:
        return ""
    return (f"the fused model measured slower than the original (speedup "
            f"{timing.speedup:.2f}x, IQR {timing.speedup_q1:.2f}–{timing.speedup_q3:.2f}x): "
            "to keep the original, use your model as it is instead of the fused one")


def summary_table(sites: Sequence[RowSite], verification: VerifyReport | None,
                  timing: BenchResult | None) -> str:
    """Sites fused, worst errors, original vs fused time and speedup with spread."""
    fused = sum(s.fused for s in sites)
    rows = [["sites fused", f"{fused} of {len(sites)}"],
            ["rows fused", str(sum(s.rows for s in sites if s.fused))]]
    rows += _verification_rows(verification)
    rows += _timing_rows(timing, fused > 0)
    return tabulate(rows, tablefmt="simple")


def format_report(sites: Sequence[RowSite], verification: VerifyReport | None,
                  timing: BenchResult | None) -> str:
    """The full text report: site table, then the summary."""
    decided = decision_lines(sites)
    middle = "\n" + "\n".join(decided) + "\n" if decided else ""
    return site_table(sites) + "\n" + middle + "\n" + summary_table(sites, verification, timing)
