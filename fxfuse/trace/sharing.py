"""Models that hold something ``copy.deepcopy`` cannot copy (a ``threading.Lock``, an open
file, a socket, a generator): fxfuse copies the model several times (to rewrite it, to
verify and to time it), so such an attribute is shared between the copies instead.

:func:`uncopyable_attributes` finds them (only plain attributes of modules: parameters,
buffers and submodules are copied as usual); :func:`shared_on_copy` makes
``copy.deepcopy`` return objects of those types as they are while fxfuse runs. The
registration is counted, so calls from several threads at once keep it until the last
one ends; it only ever turns a ``TypeError`` of ``deepcopy`` into sharing.
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import threading
from typing import Any, Iterable, Iterator

from torch import nn

_TORCH_SLOTS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                "_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called", "training"}
_lock = threading.Lock()
_held: dict[type, int] = {}


def _copyable(value: Any) -> bool:
    try:
        copy.deepcopy(value)
    except (TypeError, pickle.PicklingError, NotImplementedError):
        return False
    except Exception:  # noqa: BLE001 - some other failure: let the real copy report it
        return True
    return True


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _leaf_types(value: Any, depth: int = 4) -> set[type]:
    """The types of the objects inside ``value`` that deepcopy cannot copy (never a
    container type: sharing every dict would share far too much)."""
    if _copyable(value):
        return set()
    if isinstance(value, dict) and depth:
        return set().union(*(_leaf_types(v, depth - 1) for v in value.values()), set())
    if isinstance(value, _CONTAINERS) and depth:
        return set().union(*(_leaf_types(v, depth - 1) for v in value), set())
    inner = getattr(value, "__dict__", None)
    if isinstance(inner, dict) and depth and not isinstance(value, type):
        found = set().union(*(_leaf_types(v, depth - 1) for v in inner.values()), set())
        if found:
            return found
    return set() if isinstance(value, _CONTAINERS) else {type(value)}


def uncopyable_attributes(model: nn.Module) -> list[tuple[str, Any, set[type]]]:
    """(``path.to.attr``, value, the uncopyable types inside it) for every plain module
    attribute deepcopy cannot copy."""
    found = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name in _TORCH_SLOTS or isinstance(value, nn.Module):
                continue
            types = _leaf_types(value)
            if types:
                found.append((f"{prefix}.{name}" if prefix else name, value, types))
    return found


def _share(value: Any, memo: dict) -> Any:
    return value


@contextlib.contextmanager
def shared_on_copy(types: Iterable[type]) -> Iterator[None]:
    """While the block runs, ``copy.deepcopy`` returns objects of ``types`` unchanged."""
    mine = [t for t in dict.fromkeys(types) if isinstance(t, type)]
    with _lock:
        for t in mine:
            if _held.get(t, 0) == 0 and t in copy._deepcopy_dispatch:
                continue  # copyable by the stdlib after all: leave it alone
            _held[t] = _held.get(t, 0) + 1
            copy._deepcopy_dispatch[t] = _share
    try:
        yield
    finally:
        with _lock:
            for t in mine:
                if t not in _held:
                    continue
                _held[t] -= 1
                if _held[t] == 0:
                    del _held[t]
                    copy._deepcopy_dispatch.pop(t, None)


def sharing_note(found: list[tuple[str, Any, set[type]]]) -> str:
    """The note the result carries about the shared attributes."""
    names = ", ".join(f"{path} ({', '.join(sorted(t.__name__ for t in kinds))})"
                      for path, _, kinds in found[:4])
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    return (f"{names}{more} cannot be deep-copied, so the fused model shares "
            f"{'it' if len(found) == 1 else 'them'} with the original instead of a copy")
