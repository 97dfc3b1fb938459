"""The one TorchScript policy: a ``torch.jit.script`` or ``torch.jit.trace`` file is
refused, as MODEL or as ``--weights``, before torch reads it, in one line naming the way
out. TorchScript holds TorchScript IR, not Python code torch.fx or torch.export can trace,
so no loop in it can be found, rewritten or checked honestly."""
from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import ConfigError

WAY_OUT = ("TorchScript files (torch.jit.script or torch.jit.trace) cannot be rewritten; "
           "give the Python model as pkg.module:factory (or file.py:factory) and its weights "
           "with --weights (save them with torch.save(model.state_dict(), 'weights.pt'))")


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl`` and a
    ``code/`` folder beside its ``data.pkl``); ``False`` for anything else."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and \
        any("/code/" in n for n in names)


def refuse_torchscript(path: Path, role: str) -> None:
    """Raise the one-line refusal when ``path`` (given as ``role``) is TorchScript.

    Raises:
        ConfigError: ``path`` is a TorchScript archive.
    """
    if is_torchscript(path):
        raise ConfigError(f"{role} {str(path)!r} is a TorchScript file: {WAY_OUT}")
