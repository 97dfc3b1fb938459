"""Read a parameter by its state_dict key, and find who else uses a weight tensor."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import fx


def get_tensor(root: torch.nn.Module, key: str) -> torch.Tensor:
    """The parameter or buffer at dotted path ``key``."""
    owner, _, name = key.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    return getattr(mod, name)


def _extent(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) of a tensor's data."""
    try:
        base = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):   # meta or other storage-less tensors
        return id(tensor), 0, 1
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    span = sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride())) + 1
    return base, start, start + span * size


def tied_keys(root: torch.nn.Module, keys: Iterable[str]) -> tuple[str, str] | None:
    """Two different keys whose tensors are the same object or overlap in memory (tied by
    assignment, or views of one tensor), or None."""
    found = []
    for key in dict.fromkeys(keys):
        tensor = get_tensor(root, key)
        if tensor.numel():
            found.append((*_extent(tensor), key))
    found.sort()
    for (base, _, end, key), (base2, start2, _, key2) in zip(found, found[1:]):
        if base == base2 and start2 < end:
            return key, key2
    return None


def twin_key(ops: Iterable[Any]) -> tuple:
    """The weights some row ops read, op by op: equal keys mean the very same layers (a
    loop module applied twice), which must share one fused module so weights stay tied."""
    return tuple(op.params for op in ops)


class WeightUses:
    """Which graph nodes use each weight tensor (by identity, so tied weights count)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.users: dict[int, set[fx.Node]] = defaultdict(set)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                for tensor in gm.get_submodule(str(node.target)).parameters():
                    self.users[id(tensor)].add(node)
            elif node.op == "get_attr":
                self.users[id(get_tensor(gm, str(node.target)))].update(node.users)

    def outside_problem(self, root: torch.nn.Module, keys: list[str],
                        site_convs: set[fx.Node]) -> str:
        """Why moving these weights would untie them from another user, or ``""``."""
        for key in keys:
            others = self.users.get(id(get_tensor(root, key)), set()) - site_convs
            if others:
                other = sorted(others, key=lambda n: n.name)[0]
                return (f"{key} is also used by `{other.name}` outside the loop; "
                        "fusing would untie that weight")
        return ""
