"""The ``fxfuse`` command: inspect, fuse and demo on saved models; convert checkpoints.

Exit codes: 0 success; 1 verification refused the rewrite; 2 bad input or usage;
3 an unexpected internal error (141 when stdout is closed early, as in ``| head``).
Errors are one line on stderr (``--debug`` shows the traceback; torch's own warnings and
log lines show only with ``-v``); one progress line per stage goes to stderr, terminal or
pipe, unless ``-q``.
Outputs are written atomically, never over an input, and none is left after a failure.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ConfigError, FxFuseError, InternalError, VerificationError
from .console import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_OK, EXIT_REFUSED,  # noqa: F401
                      EXIT_USAGE, MAP_NAME, MAP_SUFFIX, SHOWN, SIGNALLED, dump_json, progress,
                      printing_progress, shown, start_clock, user_code, using_data_out, warn)

log = logging.getLogger("fxfuse")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other error
        self.exit(EXIT_USAGE, f"fxfuse: error: {message} (see {self.prog} -h)\n")


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (so every temp file is cleaned up), and
    are told apart from a KeyboardInterrupt raised by the model's code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(num: int, _frame: object) -> None:
        SIGNALLED.append(num)
        raise KeyboardInterrupt
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


_PATH_ARGS = ("weights", "out", "report_json", "map", "checkpoint", "out_dir", "decisions")
def _absolute_paths(args: argparse.Namespace) -> None:
    """Resolve every path the user gave against the current directory, before any user
    code runs (a factory that calls os.chdir must not move the outputs)."""
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value and value != "-":
            full = os.path.abspath(os.path.expanduser(value))
            SHOWN[full] = value
            setattr(args, name, full)
    model = getattr(args, "model", None)
    if isinstance(model, str) and model:
        args.model = _absolute_model(model)


def _absolute_model(model: str) -> str:
    """MODEL made absolute where it names a file: a file even with a ':' in its name,
    ``path/file.py:factory``, or a bare model file; ``module:factory`` as it is."""
    if os.path.isfile(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))
    left, sep, right = model.rpartition(":")
    if sep and left and (left.endswith(".py") or "/" in left or os.sep in left):
        return f"{os.path.abspath(os.path.expanduser(left))}:{right}"
    if not sep and Path(model).suffix.lower() in (".pt2", ".pt", ".pth", ".bin",
                                                  ".safetensors", ".py"):
        return os.path.abspath(os.path.expanduser(model))
    return model


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Keep torch's warnings, log records, graph dumps and stray tracebacks off stderr,
    so an error is exactly one line (``-v``/``--debug`` show them)."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.ERROR)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _human_output(args: argparse.Namespace) -> Iterator[None]:
    """With ``-q`` the report is not printed; with ``--report-json -`` it goes to stderr,
    so stdout holds the JSON only (written with :func:`console.emit`)."""
    to_stdout = getattr(args, "report_json", None) == "-"
    if not (args.quiet or to_stdout):
        yield
        return
    data, errors = sys.stdout, sys.stderr
    with using_data_out(data), contextlib.redirect_stdout(io.StringIO() if args.quiet
                                                          else errors):
        yield


def _common_args(p: argparse.ArgumentParser) -> None:
    """--debug and -v after the subcommand too (they default to the top-level value)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log each stage of the pass on stderr")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only errors, warnings and the JSON asked for")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="package.module:factory, path/file.py:factory, file.pt2, or a pickled "
                        "file.pt (with --allow-pickle)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="shape of one model input, e.g. 32,15,10,100 (repeat per input; "
                        "default for a .pt2: the example inputs it was exported with)")
    p.add_argument("--dtype", default=None,
                   help="float32, float16 or bfloat16, for the model and its inputs (default: "
                        "the model's own dtype, float32 inputs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments for the factory, as a JSON object, e.g. "
                        "'{\"rows\": 8}' (default: none)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="state_dict for a factory model (.pt/.pth/.bin loaded weights-only, "
                        ".safetensors, a Lightning .ckpt, or a save_pretrained directory)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling a whole-module .pt (runs code from the file: trusted files only)")
    p.add_argument("--min-rows", type=_positive_int, default=2,
                   help="leave loops with fewer rows alone (default: 2)")
    p.add_argument("--tracer", default="auto", choices=["auto", "symbolic", "export"],
                   help="how the graph is captured: auto tries torch.fx.symbolic_trace, then "
                        "torch.export, then make_fx; symbolic or export use only that one "
                        "(default: auto)")


def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lowering", default="auto",
                   choices=["auto", "grouped", "grouped2d", "im2col", "vmap"],
                   help="auto: time the candidates per site and keep the loop unless one is "
                        "faster; grouped/grouped2d/im2col: force that rewrite where it applies; "
                        "vmap: vectorise every loop of identical rows (default: auto)")
    p.add_argument("--no-bench", action="store_true", help="skip timing original vs fused")
    p.add_argument("--no-grad-check", action="store_true", help="skip the train-mode gradient check")
    p.add_argument("--rtol", type=float, default=None, help="override the verification rtol")
    p.add_argument("--atol", type=float, default=None, help="override the verification atol")
    p.add_argument("--report-json", default=None, metavar="FILE",
                   help="also write the report as JSON to FILE ('-': to stdout, the human "
                        "report then goes to stderr)")
    p.add_argument("--decisions", default=None, metavar="FILE",
                   help="auto's timing decisions: reused from FILE when it exists (no timing), "
                        "recorded into it otherwise")


_EXAMPLES = """examples:
  fxfuse inspect mypkg.model:build --input-shape 32,15,10,100
  fxfuse fuse mypkg.model:build --weights model.safetensors --input-shape 32,15,10,100 -o fused.pt2
  fxfuse fuse model.pt2 --input-shape 32,15,10,100 -o fused.pt2 --report-json -
  fxfuse weights fused.pt2.map.json finetuned.safetensors -o fused.safetensors --to fused
"""


def _version() -> str:
    from .. import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxfuse`` command."""
    parser = _Parser(prog="fxfuse", description="Rewrite per-row Conv1d loops into one grouped "
                     "convolution, verified and timed.", epilog=_EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxfuse {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each stage of the pass (with elapsed time) on stderr")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors, warnings and the JSON asked for")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="list the loops found and whether each would fuse")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("fuse", help="fuse, verify, benchmark and write OUT")
    _model_args(p)
    _fuse_args(p)
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output: .pt2 (torch.export), .pt (GraphModule), .safetensors (weights) "
                        "or .onnx (checked in ONNX Runtime; needs fxfuse[onnx])")
    p = sub.add_parser("demo", help="the built-in seed model through the saved-model path")
    _fuse_args(p)
    p.add_argument("--out-dir", default=None, help="keep the files here (default: a temp dir)")
    p = sub.add_parser("weights", help="convert a checkpoint between the looped and fused layouts")
    p.add_argument("map", metavar="MAP", help="the OUT.map.json written by 'fxfuse fuse' "
                   "(or the fused .pt2/.safetensors that holds it)")
    p.add_argument("checkpoint", metavar="IN",
                   help="state_dict file (.safetensors, .pt, .pth, .bin) or a fused .pt2")
    p.add_argument("-o", "--out", required=True, help="where to write the converted state_dict")
    p.add_argument("--to", required=True, choices=["original", "fused"],
                   help="the layout to write: 'original' (the looped model's keys) or 'fused'")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickled IN that holds Python objects besides tensors (runs "
                        "code from the file: trusted files only)")
    for p in sub.choices.values():
        _common_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by ``python -m fxfuse``)."""
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    SIGNALLED.clear()
    start_clock()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="fxfuse: %(message)s")
    from . import commands, weights_cmd
    handler = {"inspect": commands.inspect, "fuse": commands.fuse_command,
               "demo": commands.demo, "weights": weights_cmd.convert_weights}[args.command]
    try:
        with _signals_interrupt(), _human_output(args), \
                _quiet(not (args.debug or args.verbose)), \
                printing_progress(not (args.quiet or args.verbose)):
            _absolute_paths(args)
            return handler(args)
    except VerificationError as exc:
        return _fail(args, exc, EXIT_REFUSED)
    except InternalError as exc:
        return _fail(args, exc, EXIT_INTERNAL, internal=True)
    except FxFuseError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except BrokenPipeError:  # stdout closed early (``| head``): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        sig = SIGNALLED[0] if SIGNALLED else signal.SIGINT
        print("fxfuse: interrupted; nothing was written (any previous output is unchanged)",
              file=sys.stderr)
        return 128 + int(sig)
    except OSError as exc:  # the file system refused something: the user's to fix
        from ..io.transaction import os_problem
        where = exc.filename if exc.filename is not None else "a file"
        return _fail(args, os_problem(exc, Path(str(where)), "use"),
                     EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a raw traceback by default
        return _unexpected(args, exc)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - asyncio.CancelledError and the like
        return _fail(args, exc, EXIT_INTERNAL, internal=True)


def _unexpected(args: argparse.Namespace, exc: Exception) -> int:
    """An exception no fxfuse error class names: too deep a model and running out of
    memory are the user's to fix (exit 2); anything else is a bug (exit 3)."""
    if isinstance(exc, RecursionError):
        return _fail(args, ConfigError("RecursionError: the model is nested too deeply for "
                                       "Python's recursion limit; flatten its module tree"),
                     EXIT_USAGE)
    from ..running import resource_problem
    problem = resource_problem(exc, f"running 'fxfuse {args.command}'")
    if problem is not None:
        return _fail(args, problem, EXIT_USAGE)
    return _fail(args, exc, EXIT_INTERNAL, internal=True)


def _fail(args: argparse.Namespace, exc: BaseException, code: int, internal: bool = False) -> int:
    if args.debug:
        traceback.print_exc()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if internal:
        text = f"internal error: {type(exc).__name__}: {text} (rerun with --debug and report it)"
    print(f"fxfuse: error: {text}", file=sys.stderr)
    return code


