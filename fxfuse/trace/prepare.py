"""A private copy of the user's model to trace and rewrite.

``copy.deepcopy`` fails on a model using the old ``torch.nn.utils.weight_norm`` (its
forward pre-hook leaves a computed, non-leaf ``weight`` on the module). On the copy
only (the user's model is never touched):

- eval mode: the weight is fixed, so it is folded into a plain parameter and the hook
  removed; the layer can fuse.
- train mode: ``weight_g``/``weight_v`` are what trains, so the hook becomes
  ``torch.nn.utils.parametrizations.weight_norm`` (the same maths, and a module that
  copies); the matcher leaves such a layer alone, with the reason.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import TraceError
from ..weightmap import WeightEntry, WeightMap


def weight_norm_modules(model: nn.Module) -> list[tuple[str, nn.Module, WeightNorm]]:
    """Every (path, module, hook) using the old hook-based weight norm."""
    return [(name, module, hook) for name, module in model.named_modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]


def check_no_script_modules(model: nn.Module) -> None:
    """A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``) holding parameters
    or buffers inside ``model`` is a TraceError: its tensors live inside TorchScript, where
    torch.fx traces into ``_c.forward`` without them (the fused model's state_dict and
    saved weights would lose them, and the gradient check could not see them), and
    ``copy.deepcopy`` gives them back as non-leaf tensors that never get a gradient."""
    found = next(((name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.jit.ScriptModule) and _holds_tensors(m)), None)
    if found is None:
        return
    name, module = found
    what = f"submodule `{name}`" if name else f"the {type(model).__name__}"
    raise TraceError(f"{what} is a TorchScript module ({type(module).__name__}, from "
                     "torch.jit.script or torch.jit.trace): fxfuse cannot trace, copy or save "
                     "its parameters; pass the Python module it was made from (script the "
                     "fused model afterwards if you need TorchScript)")


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def deepcopy_any(model: nn.Module, *, share_parameters: bool = False) -> nn.Module:
    """``copy.deepcopy``, also for old-style weight norm (hooks kept on the copy); with
    ``share_parameters``, the copy holds the very parameters of ``model``."""
    memo: dict[int, object] = {id(p): p for _, p in model.named_parameters(
        remove_duplicate=False)} if share_parameters else {}
    for _, module, hook in weight_norm_modules(model):   # the computed weight: a plain copy
        computed = module.__dict__.get(hook.name)
        if isinstance(computed, torch.Tensor):
            memo[id(computed)] = computed.detach().clone()
    return copy.deepcopy(model, memo)


def forward_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for forward runs under ``torch.no_grad`` (or gradients taken with
    ``torch.autograd.grad``): modules and buffers (BatchNorm statistics a train-mode
    forward moves) are copied, parameters shared, so a check costs the model's buffers,
    not another copy of its weights. Never call ``backward`` through it, never cast it
    (``.to(dtype)`` would change the shared parameters in place)."""
    return deepcopy_any(model, share_parameters=True)


def copy_model(model: nn.Module) -> tuple[nn.Module, tuple[str, ...], WeightMap]:
    """A deep copy of ``model`` to work on, notes on what differs from the original, and
    the map from the copy's renamed state back to the original's names."""
    if not weight_norm_modules(model):
        return copy.deepcopy(model), (), WeightMap()
    work = deepcopy_any(model)
    folded, kept, entries = [], [], []
    for name, module, hook in weight_norm_modules(work):
        path = f"{name}.{hook.name}" if name else hook.name
        _remove_hook(module, hook)
        if module.training:
            g, v = module._parameters.pop(hook.name + "_g"), module._parameters.pop(hook.name + "_v")
            module.register_parameter(hook.name, nn.Parameter(v.detach().clone()))
            parametrizations.weight_norm(module, hook.name, hook.dim)
            base = f"{name}.parametrizations.{hook.name}" if name else \
                f"parametrizations.{hook.name}"
            with torch.no_grad():
                getattr(module.parametrizations, hook.name).original0.copy_(g)
                getattr(module.parametrizations, hook.name).original1.copy_(v)
            entries += [WeightEntry(f"{base}.original0", (f"{path}_g",)),
                        WeightEntry(f"{base}.original1", (f"{path}_v",))]
            kept.append(path)
        else:
            with torch.no_grad():
                weight = hook.compute_weight(module)
            del module._parameters[hook.name + "_g"], module._parameters[hook.name + "_v"]
            module.register_parameter(hook.name, nn.Parameter(weight.detach().clone()))
            folded.append(path)
    notes = []
    if folded:
        notes.append(f"weight_norm folded (eval mode) into {', '.join(folded)}: the returned "
                     "model has that weight in place of weight_g/weight_v")
    if kept:
        notes.append(f"weight_norm in train mode kept as torch.nn.utils.parametrizations."
                     f"weight_norm on {', '.join(kept)} (weight_g/weight_v -> original0/"
                     "original1, mapped by the weight map); such layers are not fused")
    return work, tuple(notes), WeightMap(tuple(entries))


def _remove_hook(module: nn.Module, hook: WeightNorm) -> None:
    for key, value in list(module._forward_pre_hooks.items()):
        if value is hook:
            del module._forward_pre_hooks[key]
    module.__dict__.pop(hook.name, None)
