"""Shared helpers for the trust tests: hostile archives built from a real
``torch.export.save`` output, payloads that would touch a marker file, and a driver that
runs the real command in a subprocess with one deterministic fault injected."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import torch


class Touch:
    """Unpickling this touches ``path`` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def torch_payload(marker: Path) -> bytes:
    """A ``torch.save`` file whose unpickling touches ``marker``."""
    buffer = io.BytesIO()
    torch.save(Touch(marker), buffer)
    return buffer.getvalue()


def raw_payload(marker: Path) -> bytes:
    return pickle.dumps(Touch(marker))


def rebuild(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
            add: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()) -> Path:
    """Copy the archive ``src`` to ``dst`` with entries (names without the root folder)
    replaced or added; ``deflate`` names entries stored compressed."""
    replace, add = dict(replace or {}), dict(add or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            short = info.filename[len(root):]
            data = replace.pop(short, None)
            data = zin.read(info.filename) if data is None else data
            kind = zipfile.ZIP_DEFLATED if short in deflate else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=kind)
        for short, data in {**replace, **add}.items():
            kind = zipfile.ZIP_DEFLATED if short in deflate else zipfile.ZIP_STORED
            zout.writestr(root + short, data, compress_type=kind)
    return dst


def read_entry(archive: Path, short: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        root = z.namelist()[0].split("/", 1)[0] + "/"
        return z.read(root + short)


def config_with_pickle(archive: Path, short: str, fqn: str | None, path_name: str) -> bytes:
    """The weights/constants config JSON of ``archive`` with ``fqn`` (or a new entry)
    pointing at ``path_name`` and flagged ``use_pickle``."""
    data = json.loads(read_entry(archive, short))
    key = fqn or "evil"
    entry = data["config"].get(key, {"is_param": False, "tensor_meta": None})
    entry.update(path_name=path_name, use_pickle=True)
    data["config"][key] = entry
    return json.dumps(data).encode()


DRIVER = textwrap.dedent('''
    import errno, os, signal, sys
    from fxfuse.io import transaction
    fault, arg = sys.argv[1], sys.argv[2]
    calls = {"n": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        calls["n"] += 1
        if fault == "replace-fails" and calls["n"] == int(arg):
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        real_replace(src, dst)
        if fault == "signal-after-replace" and calls["n"] == int(arg):
            os.kill(os.getpid(), signal.SIGINT)
        if fault == "kill-after-replace" and calls["n"] == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    real_write = transaction.OutputSet.write

    def write(self, target, data, mode=None):
        if fault == "signal-while-writing":
            os.kill(os.getpid(), getattr(signal, arg))
        real_write(self, target, data, mode)

    os.replace, os.fsync, transaction.OutputSet.write = replace, fsync, write
    from fxfuse.cli.main import main
    sys.exit(main(sys.argv[3:]))
''')


def run_with_fault(cwd: Path, fault: str, arg: object, *args: object) -> subprocess.CompletedProcess:
    """Run ``fxfuse ARGS`` in a subprocess with one fault injected (see ``DRIVER``)."""
    return subprocess.run([sys.executable, "-c", DRIVER, fault, str(arg), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def run_inprocess(cwd: Path, monkeypatch, capfd, *args: object) -> subprocess.CompletedProcess:
    """Run ``fxfuse ARGS`` in this process (so a fault can be patched in), in ``cwd``."""
    from fxfuse.cli.main import main
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def ours(root: Path) -> list[str]:
    """Every temp, backup, journal or lock file of fxfuse under ``root``."""
    return sorted(p.name for p in root.rglob(".fxfuse-*"))
