"""Write several output files as one transaction: all the new ones, or all the old ones.

Life of a transaction (:class:`OutputSet`):

1. :meth:`OutputSet.prepare`, before any work: take a lock next to the first output
   (``O_EXCL``; a second writer is refused), clean up stale temp files of ours in each
   directory, and create each output's temp file — the real writability check (as root
   ``os.access`` says yes to anything).
2. The caller writes the new contents into the temps (:meth:`OutputSet.write`).
3. :meth:`OutputSet.commit`, with SIGINT/SIGTERM deferred: a journal lists the targets,
   each old file is moved to a backup name, each new one renamed into place; on any
   failure the backups are renamed back and the new files removed. The backups and the
   journal are removed once every rename has succeeded.

Temp files are named ``.fxfuse-<pid>-<token>.<kind>.<name>``: a later run into the same
directory removes those whose process is dead (or older than a day), restoring the old
files from a commit that was killed half-way (its journal says which).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ConfigError

log = logging.getLogger("fxfuse")

PREFIX = ".fxfuse-"
STALE_AFTER_S = 24 * 3600
_OURS = re.compile(r"\.fxfuse-(\d+)-([0-9a-f]{8})\.(tmp|bak|journal)\.(.+)")
_LOCK = re.compile(r"\.fxfuse-lock\.(.+)")


class CommitError(ConfigError):
    """The outputs could not be committed; ``rolled_back`` says the old files are back."""

    def __init__(self, message: str, rolled_back: bool) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _is_stale(path: Path, pid: int) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return not _pid_alive(pid) or age > STALE_AFTER_S


def os_problem(exc: OSError, path: Path, action: str) -> ConfigError:
    """One line for an OSError on ``path``, with the way out."""
    fixes = {errno.ENAMETOOLONG: "use a shorter file name",
             errno.ENOSPC: "free some disk space or write elsewhere",
             errno.EDQUOT: "free some quota or write elsewhere",
             errno.EACCES: "choose a directory you can write to",
             errno.EPERM: "choose a directory you can write to",
             errno.EROFS: "the file system is read-only: write elsewhere",
             errno.ENOENT: "create the directory first",
             errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
             errno.EISDIR: "give a file name, not a directory",
             errno.EINVAL: "use a plain file name",
             errno.ELOOP: "it is a loop of symbolic links: remove the link or choose "
                          "another name"}
    fix = fixes.get(exc.errno or 0, "choose another output path")
    if exc.errno == errno.ENOENT and path.parent.is_dir():
        fix = "that directory does not accept new files: write elsewhere"
    reason = exc.strerror or type(exc).__name__
    return ConfigError(f"cannot {action} {str(path)!r} ({reason}); {fix}")


def probe_writable(target: Path) -> None:
    """Create (and remove) a temp file next to ``target``: the real writability check
    (as root ``os.access`` says yes to anything). Raises ConfigError (one line)."""
    probe = target.with_name(f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp.{target.name}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise os_problem(exc, target, "write") from exc
    except ValueError as exc:  # an embedded NUL byte
        raise ConfigError(f"cannot write {str(target)!r} ({exc}); use a plain file name") from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def recover_directories(directories: Sequence[Path]) -> None:
    """Finish what dead runs left in ``directories``: first roll back every half-done
    commit (from its journal), then remove the dead runs' temp and backup files. Only
    our names, only stale ones (dead process, or older than a day)."""
    stale: list[tuple[Path, re.Match]] = []
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            m = _OURS.fullmatch(name)
            if m and _is_stale(directory / name, int(m.group(1))):
                stale.append((directory / name, m))
            elif _LOCK.fullmatch(name):
                holder = _lock_holder(directory / name)
                if holder is not None and _is_stale(directory / name, holder):
                    with contextlib.suppress(OSError):
                        (directory / name).unlink()
    for path, m in stale:
        if m.group(3) == "journal":
            _roll_back_journal(path, m.group(1), m.group(2))
    for path, _ in stale:
        with contextlib.suppress(OSError):
            path.unlink()
            log.info("removed stale %s", path)


def _roll_back_journal(journal: Path, pid: str, token: str) -> None:
    """Put back the old files of a commit killed half-way (new-only targets removed)."""
    try:
        entries = json.loads(journal.read_text())["targets"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for entry in entries:
        target = Path(entry["path"])
        backup = target.with_name(f"{PREFIX}{pid}-{token}.bak.{target.name}")
        with contextlib.suppress(OSError):
            if entry.get("had_old") and backup.exists():
                os.replace(backup, target)
            elif not entry.get("had_old") and entry.get("committed_ino") is not None \
                    and target.exists() and target.stat().st_ino == entry["committed_ino"]:
                target.unlink()
    log.warning("restored the previous files of an interrupted run (%s)", journal.name)


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM until the block ends; yields the signals that arrived."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, lambda num, _frame: got.append(num))
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class OutputSet:
    """Output files written together (see the module docstring).

    Args:
        paths: absolute output paths; the first one is locked against other writers.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.temps = {p: self._name(p, "tmp") for p in self.paths}
        self.lock: Path | None = None

    def _name(self, target: Path, kind: str) -> Path:
        return target.with_name(f"{PREFIX}{self.token}.{kind}.{target.name}")

    def prepare(self) -> None:
        """Lock, clean stale files, create every temp. Raises ConfigError (one line)."""
        recover_directories(list(dict.fromkeys(p.parent for p in self.paths)))
        self._take_lock()
        try:
            for target, temp in self.temps.items():
                self._create(target, temp)
        except BaseException:
            self.abort()
            raise

    def _create(self, target: Path, temp: Path) -> None:
        if target.is_dir():
            raise ConfigError(f"output {str(target)!r} is a directory; give a file name")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise os_problem(exc, target, "write") from exc
        except ValueError as exc:  # an embedded NUL byte
            raise ConfigError(f"cannot write {str(target)!r} ({exc}); use a plain file "
                              "name") from exc
        os.close(fd)

    def _take_lock(self) -> None:
        target = self.paths[0]
        lock = target.with_name(f"{PREFIX}lock.{target.name}")
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                holder = _lock_holder(lock)
                if _is_stale(lock, holder) if holder is not None else _older(lock, 60):
                    with contextlib.suppress(OSError):
                        lock.unlink()
                    continue
                raise ConfigError(f"another fxfuse run (pid {holder}) is writing "
                                  f"{str(target)!r}; wait for it to finish, or remove "
                                  f"{str(lock)!r} if no such run exists") from None
            except OSError as exc:
                raise os_problem(exc, target, "write") from exc
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self.lock = lock
            return
        raise ConfigError(f"cannot lock {str(target)!r}; remove {str(lock)!r} and retry")

    def write(self, target: Path, data: bytes, mode: int | None = None) -> None:
        """Write ``data`` to ``target``'s temp and flush it to disk.

        Raises:
            ConfigError: an OSError (full disk, say), in one line.
        """
        temp = self.temps[target]
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, _new_file_mode(target) if mode is None else mode)
        except OSError as exc:
            raise os_problem(exc, target, "write") from exc

    def commit(self) -> list[int]:
        """Move every temp into place together, signals deferred.

        Returns:
            The signals that arrived during the commit (the caller reports them; the new
            files are all in place).

        Raises:
            CommitError: a rename failed; the old files were put back (``rolled_back``).
        """
        with deferred_signals() as got:
            self._commit()
        return got

    def _commit(self) -> None:
        journal = self._name(self.paths[0], "journal")
        targets = [{"path": str(p), "had_old": os.path.lexists(p), "committed_ino": None}
                   for p in self.paths]
        done: list[tuple[Path, bool]] = []
        try:
            journal.write_text(json.dumps({"targets": targets}))
            for entry, target in zip(targets, self.paths):
                if entry["had_old"]:
                    os.replace(target, self._name(target, "bak"))
                done.append((target, bool(entry["had_old"])))
                os.replace(self.temps[target], target)
                entry["committed_ino"] = target.stat().st_ino
                journal.write_text(json.dumps({"targets": targets}))
        except BaseException as exc:
            rolled_back = self._roll_back(done)
            with contextlib.suppress(OSError):
                journal.unlink()
            state = ("the previous files are unchanged" if rolled_back else
                     f"rolling back failed too: the previous files are under "
                     f"{PREFIX}{self.token}.bak.*")
            if isinstance(exc, OSError):
                raise CommitError(f"{os_problem(exc, Path(exc.filename or self.paths[0]), 'write')}"
                                  f"; {state}", rolled_back) from exc
            raise CommitError(f"writing the outputs failed ({type(exc).__name__}); {state}",
                              rolled_back) from exc
        for target in self.paths:
            with contextlib.suppress(OSError):
                self._name(target, "bak").unlink()
        with contextlib.suppress(OSError):
            journal.unlink()
        self._release()

    def _roll_back(self, done: list[tuple[Path, bool]]) -> bool:
        ok = True
        for target, had_old in reversed(done):
            backup = self._name(target, "bak")
            try:
                if had_old:
                    if backup.exists():
                        os.replace(backup, target)
                elif os.path.lexists(target) and not self.temps[target].exists():
                    target.unlink()
            except OSError:
                ok = False
        return ok

    def abort(self) -> None:
        """Remove the temps and the lock (the outputs are untouched)."""
        for temp in self.temps.values():
            with contextlib.suppress(OSError):
                temp.unlink()
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            with contextlib.suppress(OSError):
                self.lock.unlink()
            self.lock = None

    def __enter__(self) -> "OutputSet":
        self.prepare()
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _older(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return True


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _new_file_mode(path: Path) -> int:
    """The permission bits the output should get: the old file's, or 0o666 less umask."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
