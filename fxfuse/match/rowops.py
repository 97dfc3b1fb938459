"""What a per-row op is: a conv, a linear layer, a batch norm, or a pointwise op.

Rows of a loop fuse when, step by step, their ops have equal *keys*: the settings that
must agree for one fused op to compute every row (weights aside). Pointwise ops
(activations, dropout, arithmetic with a Python number) are applied once to all rows.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .convspec import conv_spec, get_tensor
from .ops import conv_call, hooks_of

aten = torch.ops.aten

# Elementwise ops: applying them to all rows at once equals applying them row by row.
_POINTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.tanh, F.sigmoid, F.dropout,
    torch.relu, torch.tanh, torch.sigmoid, torch.dropout, torch.abs, torch.exp, torch.neg,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.clamp, torch.square, torch.clone,
}
_POINTWISE_METHODS = {"relu", "tanh", "sigmoid", "abs", "exp", "neg", "mul", "add", "sub",
                      "div", "clamp", "square", "__mul__", "__add__", "__sub__", "__truediv__",
                      "contiguous", "clone"}
_POINTWISE_ATEN = {aten.relu, aten.gelu, aten.silu, aten.elu, aten.leaky_relu, aten.hardtanh,
                   aten.tanh, aten.sigmoid, aten.mul, aten.add, aten.sub, aten.div, aten.clamp,
                   aten.abs, aten.exp, aten.neg, aten.dropout, aten.relu6, aten.hardswish,
                   aten.mish, aten.softplus, aten.square}
_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU,
                      nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                      nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
_LINEAR_FUNCTIONS = {F.linear}


@dataclass(frozen=True)
class RowOp:
    """One per-row op.

    Attributes:
        node: the graph node.
        kind: ``"conv"``, ``"linear"``, ``"batchnorm"``, ``"pointwise"`` (elementwise) or
            ``"pad"`` (padding of the last dim: the same for all rows, but it does not
            commute with moving dims around the way elementwise ops do).
        key: equal keys → one fused op computes both rows.
        params: (role, state_dict key) of each tensor the op reads (weight, bias, ...).
        module: the call_module target, when the op is a module call.
        input: the tensor the op transforms.
        label: a short text for reports (``conv 15→15 k3``, ``relu``).
    """

    node: fx.Node
    kind: str
    key: Any
    params: tuple[tuple[str, str], ...]
    module: str | None
    input: fx.Node
    label: str

    def param(self, role: str) -> str | None:
        """The state_dict key playing ``role``, if any."""
        return dict(self.params).get(role)


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", None)


def _tensor_args_only_first(node: fx.Node) -> bool:
    nodes = node.all_input_nodes
    return bool(nodes and node.args and node.args[0] is nodes[0]
                and all(n is nodes[0] for n in nodes))


_PAD = {F.pad, torch.constant_pad_nd}
_PAD_ATEN = {aten.pad, aten.constant_pad_nd, aten.reflection_pad1d, aten.replication_pad1d}


def _last_dim_pad(node: fx.Node) -> RowOp | None:
    """Padding of the last dim only (how exported convs with padding_mode="reflect" etc.
    pad each row): the same on every channel, so it pads all rows at once."""
    if node.op != "call_function" or not (node.target in _PAD or _packet(node.target) in _PAD_ATEN):
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", node.kwargs.get("padding"))
    if not isinstance(pad, (list, tuple)) or len(pad) != 2 or not _tensor_args_only_first(node):
        return None
    key = ("pad", node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))
    return RowOp(node, "pad", key, (), None, node.args[0], "pad")


def _pointwise(node: fx.Node, root: nn.Module) -> RowOp | None:
    pad = _last_dim_pad(node)
    if pad is not None:
        return pad
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if type(mod) not in _POINTWISE_MODULES or hooks_of(mod) or len(node.args) != 1:
            return None
        key = ("module", type(mod), mod.extra_repr(), mod.training)
        name = type(mod).__name__.lower()
    elif node.op == "call_function" and (node.target in _POINTWISE_FUNCTIONS
                                         or _packet(node.target) in _POINTWISE_ATEN):
        key = ("function", node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))
        name = getattr(_packet(node.target) or node.target, "__name__", str(node.target))
    elif node.op == "call_method" and node.target in _POINTWISE_METHODS:
        key = ("method", node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))
        name = str(node.target).strip("_")
    else:
        return None
    if not _tensor_args_only_first(node):
        return None          # e.g. x_h * y: the other operand is not a constant
    return RowOp(node, "pointwise", key, (), None, node.args[0], name)


def _conv(node: fx.Node, root: nn.Module) -> RowOp | None:
    call = conv_call(node, root)
    if call is None:
        return None
    spec = conv_spec(root, call)
    params = (("weight", call.weight_key),) + ((("bias", call.bias_key),) if call.bias_key else ())
    return RowOp(node, "conv", spec, params, call.module_target, call.input,
                 f"conv {spec.describe()}")


def _linear(node: fx.Node, root: nn.Module) -> RowOp | None:
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if not isinstance(mod, nn.Linear) or len(node.args) != 1 or \
                not isinstance(node.args[0], fx.Node):
            return None
        w, b, inp = f"{node.target}.weight", \
            f"{node.target}.bias" if mod.bias is not None else None, node.args[0]
    elif node.op == "call_function" and (node.target in _LINEAR_FUNCTIONS
                                         or _packet(node.target) is aten.linear):
        args = list(node.args) + [node.kwargs.get("weight"), node.kwargs.get("bias")]
        inp, weight = args[0], args[1]
        bias = args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (weight,) +
                   ((bias,) if bias is not None else ())):
            return None
        w, b = str(weight.target), None if bias is None else str(bias.target)
    else:
        return None
    weight = get_tensor(root, w)
    key = ("linear", tuple(weight.shape), b is not None, weight.dtype, str(weight.device))
    params = (("weight", w),) + ((("bias", b),) if b else ())
    return RowOp(node, "linear", key, params, str(node.target) if node.op == "call_module"
                 else None, inp, f"linear {weight.shape[1]}→{weight.shape[0]}")


_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _batchnorm(node: fx.Node, root: nn.Module) -> RowOp | None:
    if node.op == "call_function" and _packet(node.target) is aten.batch_norm:
        return _aten_batchnorm(node, root)
    if node.op != "call_module":
        return None
    mod = root.get_submodule(str(node.target))
    if type(mod) is not nn.BatchNorm1d or len(node.args) != 1:
        return None
    key = ("batchnorm", mod.num_features, mod.eps, mod.momentum, mod.affine,
           mod.track_running_stats, mod.training, mod.weight.dtype if mod.affine else None)
    params = tuple((r, f"{node.target}.{r}") for r in _BN_BUFFERS
                   if getattr(mod, r, None) is not None)
    return RowOp(node, "batchnorm", key, params, str(node.target), node.args[0],
                 f"batchnorm {mod.num_features}")


def _aten_batchnorm(node: fx.Node, root: nn.Module) -> RowOp | None:
    """``aten.batch_norm`` of an exported model in eval mode (running statistics)."""
    args = list(node.args) + [None] * (9 - len(node.args))
    inp, weight, bias, mean, var, training, momentum, eps = args[:8]
    tensors = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    if training is not False or not isinstance(inp, fx.Node) or mean is None or var is None:
        return None
    if not all(t is None or isinstance(t, fx.Node) and t.op == "get_attr" for t in tensors.values()):
        return None
    params = tuple((role, str(t.target)) for role, t in tensors.items() if t is not None)
    owner = params[-1][1].rpartition(".")[0]
    counter = f"{owner}.num_batches_tracked"
    try:
        get_tensor(root, counter)
        params += (("num_batches_tracked", counter),)
    except AttributeError:
        pass
    running = get_tensor(root, str(mean.target))
    affine = weight is not None and bias is not None
    key = ("batchnorm", int(running.shape[0]), float(eps), momentum, affine, True, False,
           get_tensor(root, str(weight.target)).dtype if affine else None)
    return RowOp(node, "batchnorm", key, params, None, inp, f"batchnorm {running.shape[0]}")


def row_op(node: fx.Node, root: nn.Module) -> RowOp | None:
    """Describe ``node`` as a per-row op fxfuse can fuse, or None."""
    for recognise in (_conv, _linear, _batchnorm, _pointwise):
        op = recognise(node, root)
        if op is not None:
            return op
    return None


def module_problem(root: nn.Module, op: RowOp) -> str:
    """Why this op's module cannot be replaced by a fused one, or ``""``."""
    if op.module is None or op.kind in ("pointwise", "pad"):
        return ""
    mod = root.get_submodule(op.module)
    base = {"conv": nn.Conv1d, "linear": nn.Linear, "batchnorm": nn.BatchNorm1d}[op.kind]
    if type(mod).forward is not base.forward:
        return f"{op.module} is a {type(mod).__name__} with its own forward"
    hooks = hooks_of(mod)
    if hooks:
        return f"{op.module} has {', '.join(hooks)}, which a fused module would lose"
    return ""
