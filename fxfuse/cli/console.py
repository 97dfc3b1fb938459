"""What every ``fxfuse`` subcommand shares: exit codes, the weight-map names, progress
and warning lines on the real stderr, running the model's own code with its prints and
exits contained, paths shown as the user wrote them, and JSON for reports."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from typing import Iterator

from ..errors import ConfigError, one_line
from ..io.maps import MAP_NAME  # noqa: F401 - re-exported
from ..progress import listening, stage

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it
MAP_SUFFIX = ".map.json"


_CLOCK = [time.monotonic()]
_DATA_OUT: list = []          # where emit() writes while stdout is redirected
PROGRESS_PREFIX = "fxfuse: ["   # a progress line: ``fxfuse: [12.3s] verifying the rewrite``


def start_clock() -> None:
    """Elapsed times in progress lines count from now."""
    _CLOCK[0] = time.monotonic()


def progress(message: str) -> None:
    """Say what is happening (logged at INFO on the ``fxfuse`` logger, and printed by
    :func:`printing_progress` while it is on)."""
    stage(message)


def _print_stage(message: str) -> None:
    console = sys.__stderr__
    if console is not None:
        print(f"{PROGRESS_PREFIX}{time.monotonic() - _CLOCK[0]:.1f}s] {message}",
              file=console, flush=True)


@contextlib.contextmanager
def printing_progress(enabled: bool) -> Iterator[None]:
    """Print every stage (the command's and the pass's) on the real stderr, with the time
    since the command started, whether stderr is a terminal or a pipe."""
    if not enabled:
        yield
        return
    with listening(_print_stage):
        yield


@contextlib.contextmanager
def using_data_out(stream: object) -> Iterator[None]:
    """Make :func:`emit` write to ``stream`` while the block runs."""
    _DATA_OUT.append(stream)
    try:
        yield
    finally:
        _DATA_OUT.pop()


def emit(text: str) -> None:
    """Machine-readable output (JSON): on stdout even when the report is not."""
    print(text, file=_DATA_OUT[-1] if _DATA_OUT else sys.stdout, flush=True)


SIGNALLED: list[int] = []     # signals received by this process (not raised by user code)


def warn(message: str) -> None:
    """One ``fxfuse: warning:`` line on the real stderr (shown even when quiet)."""
    console = sys.__stderr__
    if console is not None:
        print(f"fxfuse: warning: {message}", file=console, flush=True)


@contextlib.contextmanager
def user_code(doing: str) -> Iterator[None]:
    """Run the model's own code: its prints go to stderr (stdout stays the report or the
    JSON), and ``sys.exit`` / ``KeyboardInterrupt`` raised by it become one ConfigError
    (a real Ctrl-C or SIGTERM still interrupts)."""
    try:
        with contextlib.redirect_stdout(sys.__stderr__ or io.StringIO()):
            yield
    except SystemExit as exc:
        raise ConfigError(f"the model's code called sys.exit({exc.code!r}) while {doing}; "
                          "remove the exit from the model (fxfuse runs its forward several "
                          "times)") from exc
    except KeyboardInterrupt as exc:
        if SIGNALLED:
            raise
        raise ConfigError(f"the model's code raised KeyboardInterrupt while {doing}; remove "
                          "the raise from the model") from exc
    except RecursionError as exc:
        raise ConfigError(f"RecursionError while {doing}: the model is nested too deeply for "
                          "Python's recursion limit; flatten its module tree") from exc
    except (Exception, GeneratorExit):
        raise
    except BaseException as exc:  # asyncio.CancelledError and other BaseExceptions
        what = type(exc).__name__
        text = one_line(exc)
        raise ConfigError(f"the model's code raised {what}{'' if text == what else ': ' + text} "
                          f"while {doing}; remove that raise from the model (fxfuse calls it "
                          "outside any event loop or task)") from exc


SHOWN: dict[str, str] = {}    # absolute path -> as the user wrote it


def shown(path: object) -> str:
    """``path`` as the user wrote it on the command line (messages), else as given."""
    text = str(path)
    for full in sorted(SHOWN, key=len, reverse=True):  # OUT.map.json shown like OUT
        if text.startswith(full) and "/" not in text[len(full):]:
            return SHOWN[full] + text[len(full):]
    return text


def dump_json(data: object) -> str:
    """JSON text for reports (tensors' dtypes and devices as strings)."""
    return json.dumps(data, indent=2, default=str)
