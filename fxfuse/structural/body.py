"""One row as a function of its parameters and inputs, and the rows' parameters stacked.

Row 0's nodes are copied into a small GraphModule whose modules and attributes are
row 0's (named ``m0, m1, ...`` and ``a0, a1, ...``); its placeholders are the row's
inputs, in the plan's slot order. Every other row has the same modules and attributes
in the same slots, so ``torch.func.functional_call`` over each slot's tensors stacked on
a new dim 0 runs row ``r`` when given slice ``r``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .plan import RowPlan, Refused
from .sizes import varying_axis


@dataclass(frozen=True)
class StackedTensor:
    """A fused parameter or buffer: ``parts`` (original names, one per row) stacked;
    when the parts differ in size along their dim ``pad_dim``, each is zero-padded to
    the largest first (``sizes``: each part's size along it)."""

    name: str
    parts: tuple[str, ...]
    value: torch.Tensor
    parameter: bool
    persistent: bool
    requires_grad: bool = False
    pad_dim: int | None = None
    sizes: tuple[int, ...] = ()

    def part(self, row: int) -> torch.Tensor:
        """Row ``row``'s own tensor (its padding sliced off), a view of ``value``."""
        if self.pad_dim is None:
            return self.value[row]
        return self.value[row].narrow(self.pad_dim, 0, self.sizes[row])


@dataclass(frozen=True)
class RowFunction:
    """Row 0 as a module; which of its tensors are stacked and which are shared.

    Attributes:
        module: the row's GraphModule (placeholders ``in0, in1, ...``, tuple output).
        stacked: the per-row tensors, stacked (name inside ``module`` -> tensor).
        shared: tensors of modules every row calls alike (name -> original path).
    """

    module: fx.GraphModule
    stacked: tuple[StackedTensor, ...]
    shared: dict[str, str]


def row_function(plan: RowPlan, gm: fx.GraphModule) -> RowFunction:
    """Build row 0's function and stack every row's tensors slot by slot."""
    root, graph, env = nn.Module(), fx.Graph(), {}
    for slot, node in enumerate(n[0] for n in plan.inputs):
        env[node] = graph.placeholder(f"in{slot}")
    slots: list[tuple[str, list[str], str]] = []     # (slot name, per-row targets, op)
    for pos, node in enumerate(plan.bodies[0]):
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            targets = [str(b[pos].target) for b in plan.bodies]
            name = f"{'m' if node.op == 'call_module' else 'a'}{len(slots)}"
            _attach(root, name, _lookup(gm, targets[0]), node.op)
            new.target = name
            slots.append((name, targets, node.op))
        env[node] = new
    graph.output(tuple(env[plan.bodies[0][p]] for p in plan.leaks))
    module = fx.GraphModule(root, graph)
    stacked, shared = _stack(gm, slots)
    return RowFunction(module, tuple(stacked), shared)


def _lookup(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _attach(root: nn.Module, name: str, value, op: str) -> None:
    if op == "call_module" or isinstance(value, nn.Parameter):
        setattr(root, name, value)
    elif isinstance(value, torch.Tensor):
        root.register_buffer(name, value)
    else:
        raise Refused(f"a row reads the attribute `{name}` of type {type(value).__name__}, "
                      "which is not a tensor")


def _tensors(value, op: str) -> list[tuple[str, torch.Tensor, bool, bool]]:
    """(name, tensor, is parameter, persistent) of a module slot or an attribute slot."""
    if op == "get_attr":
        return [("", value, isinstance(value, nn.Parameter), True)]
    found = [(n, p, True, True) for n, p in value.named_parameters(remove_duplicate=False)]
    for prefix, sub in value.named_modules(remove_duplicate=False):
        for n, b in sub._buffers.items():
            if b is not None:
                full = f"{prefix}.{n}" if prefix else n
                found.append((full, b, False, n not in sub._non_persistent_buffers_set))
    return found


def _stack(gm: fx.GraphModule, slots) -> tuple[list[StackedTensor], dict[str, str]]:
    stacked, shared = [], {}
    for name, targets, op in slots:
        per_row = [_tensors(_lookup(gm, t), op) for t in targets]
        for k, (sub, tensor, is_param, persistent) in enumerate(per_row[0]):
            inner = f"{name}.{sub}" if sub else name
            paths = tuple(f"{t}.{sub}" if sub else t for t in targets)
            if len(set(targets)) == 1:
                shared[inner] = paths[0]
                continue
            values = [row[k][1] for row in per_row]
            if len({id(v) for v in values}) != len(values):
                raise Refused(f"rows share the tensor `{paths[0]}`, which a stacked copy "
                              "would untie")
            value, axis, sizes = _stacked(values)
            stacked.append(StackedTensor(inner, paths, value, is_param, persistent,
                                         values[0].requires_grad, axis, sizes))
    return stacked, shared


def _stacked(values: list[torch.Tensor]
             ) -> tuple[torch.Tensor, int | None, tuple[int, ...]]:
    """The rows' tensors stacked (padded to the largest along the axis they differ on),
    that axis and each row's size along it."""
    axis = varying_axis([tuple(v.shape) for v in values])
    with torch.no_grad():
        value = torch.stack([_padded(v.detach(), axis, values) for v in values])
    return value, axis, tuple(v.shape[axis] for v in values) if axis is not None else ()


def _padded(value: torch.Tensor, axis: int | None, values: list[torch.Tensor]) -> torch.Tensor:
    """``value`` zero-padded at the end of ``axis`` to the largest of ``values``."""
    if axis is None:
        return value
    if axis < 0:
        raise Refused("a row's tensors differ in more than one size")
    shape = list(value.shape)
    shape[axis] = max(v.shape[axis] for v in values) - shape[axis]
    return torch.cat([value, value.new_zeros(shape)], axis)
