"""Count the hostile-input test cases the suite tries, by group, and how each group ends.

The cases are the tests pytest collects from ``tests/test_trust_*.py``,
``tests/test_cli_errors.py`` and ``tests/test_negatives.py`` (each parametrised case
counts once). A group is the test file (and class, where there is one); how a case ends
is read from the words of the test's name (or else the first line of its docstring):

- ``refusal (kept, with reason)``: left alone, kept, refusal, unchanged...;
- ``exit 2 / error``: error, exit, raises, rejected, refused, "one line"...;
- ``correct result``: everything else (the hostile input is handled and the result
  checked).

Usage::

    python benchmarks/hostile_count.py            # table on stdout
    python benchmarks/hostile_count.py --md FILE  # also write it as Markdown
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("tests/test_trust_*.py", "tests/test_cli_errors.py", "tests/test_negatives.py")
ERROR_WORDS = {"error", "errors", "exit", "exits", "raise", "raises", "reject", "rejected",
               "rejects", "fails", "invalid", "oom", "unreadable", "refused", "refuses",
               "refuse", "unknown"}
KEPT_WORDS = {"kept", "refusal", "declined", "unchanged", "untouched", "alone"}


def ending(name: str, doc: str) -> str:
    """How a case ends, from the words of its test's name (then its docstring's first
    line): a refused rewrite (a loop left alone, kept) before an error, since "refused"
    in a name that also leaves the loop alone is the rewrite's refusal."""
    for text in (name, doc):
        words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
        pairs = set(zip(words, words[1:]))
        if set(words) & KEPT_WORDS or ("left", "alone") in pairs:
            return "refusal (kept, with reason)"
        if set(words) & ERROR_WORDS or ("one", "line") in pairs:
            return "exit 2 / error"
    return "correct result"


class _Collect:
    def __init__(self) -> None:
        self.items: list = []

    def pytest_collection_modifyitems(self, items) -> None:
        self.items.extend(items)


def collect() -> list:
    paths = sorted(str(p) for pattern in FILES for p in ROOT.glob(pattern))
    plugin = _Collect()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                       plugins=[plugin])
    if code not in (0, 5):
        sys.exit(f"collection failed (pytest exit {code})")
    return plugin.items


def table(items: list) -> list[tuple[str, str, int]]:
    counts: collections.Counter = collections.Counter()
    for item in items:
        parts = item.nodeid.split("::")
        group = "::".join(parts[:-1]).removeprefix("tests/")
        func = getattr(item, "function", None)
        doc = ((func.__doc__ or "").strip().splitlines() or [""])[0] if func else ""
        counts[(group, ending(getattr(item, "originalname", item.name), doc))] += 1
    return sorted((g, e, n) for (g, e), n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", type=Path, help="also write the table as Markdown")
    args = parser.parse_args()
    rows = table(collect())
    by_end = collections.Counter()
    for _, e, n in rows:
        by_end[e] += n
    lines = ["| group | ends in | cases |", "| --- | --- | ---: |"]
    lines += [f"| {g} | {e} | {n} |" for g, e, n in rows]
    lines += [f"| **all** | {e} | {n} |" for e, n in sorted(by_end.items())]
    lines.append(f"| **all** | total | {sum(by_end.values())} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text("# Hostile inputs the suite tries\n\nCollected by "
                           "`benchmarks/hostile_count.py` (pytest collection; the ending "
                           "is read from each test's name and docstring).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
