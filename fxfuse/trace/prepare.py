"""A private copy of the user's model to trace and rewrite.

``copy.deepcopy`` fails on a model using the old ``torch.nn.utils.weight_norm`` (its
forward pre-hook leaves a computed, non-leaf ``weight`` on the module). In eval mode
that weight is fixed: the copy gets it folded into a plain parameter (the hook removed
on the copy only), so the layer can fuse. In train mode ``weight_g``/``weight_v`` are
what trains, and folding would change that: one clear error names the way out.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import TraceError


def weight_norm_modules(model: nn.Module) -> list[tuple[str, nn.Module, WeightNorm]]:
    """Every (path, module, hook) using the old hook-based weight norm."""
    return [(name, module, hook) for name, module in model.named_modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]


def copy_model(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """A deep copy of ``model`` to work on, and notes on what differs from the original.

    Raises:
        TraceError: the model uses old-style weight norm in train mode.
    """
    hooked = weight_norm_modules(model)
    if not hooked:
        return copy.deepcopy(model), ()
    training = [name for name, module, _ in hooked if module.training]
    if training:
        raise TraceError(
            f"{type(model).__name__}.{training[0] or 'self'} uses torch.nn.utils.weight_norm "
            "(hooks) in train mode, which cannot be copied; call model.eval() to fold the "
            "weight, or use torch.nn.utils.parametrizations.weight_norm")
    memo: dict[int, object] = {}
    for _, module, hook in hooked:       # the computed weight: copied as a plain tensor
        computed = getattr(module, hook.name, None)
        if isinstance(computed, torch.Tensor):
            memo[id(computed)] = computed.detach().clone()
    work = copy.deepcopy(model, memo)
    folded = []
    for name, module, hook in weight_norm_modules(work):
        with torch.no_grad():
            weight = hook.compute_weight(module)
        module._forward_pre_hooks = type(module._forward_pre_hooks)(
            (k, h) for k, h in module._forward_pre_hooks.items() if h is not hook)
        del module._parameters[hook.name + "_g"], module._parameters[hook.name + "_v"]
        if hook.name in module.__dict__:
            del module.__dict__[hook.name]
        module.register_parameter(hook.name, nn.Parameter(weight.detach().clone()))
        folded.append(f"{name}.{hook.name}")
    return work, (f"weight_norm folded (eval mode) into {', '.join(folded)}: the returned "
                  "model has that weight in place of weight_g/weight_v",)
