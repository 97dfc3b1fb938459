"""The one error hierarchy of fxfuse.

Every error a user can see derives from :class:`FxFuseError`; the command line turns
each into one line on stderr and an exit code. Messages name the node, site or shape
at fault and the way out.
"""
from __future__ import annotations


class FxFuseError(Exception):
    """Root of every error raised by fxfuse."""


class ConfigError(FxFuseError, ValueError):
    """An option or argument has a value the pass cannot use."""


class TraceError(FxFuseError):
    """The model could not be turned into a graph."""


class RewriteError(FxFuseError):
    """A planned rewrite could not be applied; the model was left as it was."""


class InternalError(FxFuseError):
    """A bug in fxfuse itself (e.g. a rewrite that raised); the message names the site.
    The command line reports it as an internal error (exit 3)."""


class ResourceError(FxFuseError):
    """A resource ran out (memory, say); the message names which and how much was asked."""


class VerificationError(FxFuseError):
    """The rewritten model's numbers differ from the original's; the rewrite is refused.

    Attributes:
        max_abs: the largest absolute difference seen.
        max_rel: the largest relative difference seen.
        check: which check failed (e.g. ``"example inputs"``, ``"batch 33"``, ``"grad layers.0.weight"``).
    """

    def __init__(self, message: str, *, max_abs: float = float("nan"),
                 max_rel: float = float("nan"), check: str = "") -> None:
        super().__init__(message)
        self.max_abs = max_abs
        self.max_rel = max_rel
        self.check = check


class CannotTime(Exception):
    """A site's loop cannot be run on its own, so ``auto`` cannot time it (the message
    says why); the loop is kept. Not an error the user sees: it becomes a site's note."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters."""
    text = one_line(exc) if str(exc).strip() else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
