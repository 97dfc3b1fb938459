"""One train-mode forward/backward of the original and the rewritten model: outputs,
input gradients, parameter gradients (mapped back through the :class:`WeightMap`) and
buffers after the step. Knows nothing of matching."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import VerificationError, one_line
from ..trace.prepare import forward_copy
from ..weightmap import WeightMap
from .compare import Check, compare, leaves as _leaves
from .precision import PrecisionMode
from .runs import random_nodes, run


def quiet_dropout(model: torch.nn.Module) -> None:
    """Dropout draws different masks when applied once to all rows than row by row; the
    checks run it as identity, in both models alike, so everything else is compared."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()


def draws_hidden_random(model: torch.nn.Module, inputs: Sequence[Any], seed: int) -> bool:
    """True when ``model``, in its mode with its dropout modules quiet, still gives other
    outputs under another seed: it draws random numbers fxfuse cannot switch off (an
    ``nn.MultiheadAttention(dropout=...)`` calls dropout inside its forward)."""
    if not getattr(model, "training", False):
        return False
    quiet = forward_copy(model)
    quiet_dropout(quiet)
    try:
        with torch.no_grad():
            first, second = run(quiet, inputs, seed), run(quiet, inputs, seed + 1)
    except Exception:  # noqa: BLE001 - a model that fails here fails in the checks too
        return False
    return any(a.shape != b.shape or not torch.equal(a, b)
               for a, b in zip(_leaves(first), _leaves(second)))


def grad_checks(original: torch.nn.Module, fused: torch.nn.Module, inputs: tuple[Any, ...],
                 weight_map: WeightMap, seed: int, rtol: float | None, atol: float | None,
                 skipped: list[str], mode: PrecisionMode | None = None) -> list[Check]:
    try:
        return _train_step_checks(original, fused, inputs, weight_map, seed, rtol, atol,
                                  skipped, None)
    except VerificationError as refusal:
        # A gradient that cancels to ~0 (a conv bias before a train-mode BatchNorm, say)
        # carries rounding noise far above its own size. Run the step again in float64:
        # only a difference that survives there is a real one.
        # Under TF32 (or reduced reductions) outputs too differ by the mode's rounding;
        # float64 runs no such shortcut, so it checks the maths exactly.
        reduced = mode is not None and any(mode.reduced_for(p.dtype) for p in
                                           original.parameters())
        if rtol is not None or atol is not None or refusal.max_abs == float("inf") or \
                ("grad" not in refusal.check and not reduced):
            raise
        try:
            checks = _train_step_checks(original, fused, inputs, weight_map, seed, rtol, atol,
                                        [], torch.float64)
        except Exception:  # noqa: BLE001 - float64 disagrees or cannot run: keep the refusal
            raise refusal from None
        why = (f"under {mode.describe()}" if reduced else "in the model's dtype") + \
            f", rounding noise exceeded the tolerance ({refusal.check}, {refusal.max_abs:.3g})"
        skipped.append(f"train step compared in float64: {why}")
        return checks


def _train_copies(original: torch.nn.Module, fused: torch.nn.Module,
                  inputs: tuple[Any, ...], dtype: torch.dtype | None, quiet: bool = True
                  ) -> tuple[torch.nn.Module, torch.nn.Module, tuple[Any, ...], str]:
    """Copies of both models (and the floating inputs) cast to ``dtype`` when given, put in
    train mode with dropout quiet (``quiet``); and the mode's name for the checks' labels.
    In the models' own dtype the copies share their parameters (:func:`forward_copy`):
    :func:`_step` takes gradients with ``torch.autograd.grad``, which leaves every
    parameter's ``.grad`` alone; a cast needs parameters of its own."""
    how = forward_copy if dtype is None else copy.deepcopy
    ref_model, new_model = how(original), how(fused)
    if dtype is not None:
        ref_model, new_model = ref_model.to(dtype), new_model.to(dtype)
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in inputs)
    try:
        new_model.train()          # first: an exported graph may refuse to switch
        ref_model.train()
        mode = "train"
    except Exception:  # noqa: BLE001 - exported graphs keep the mode they were traced in
        mode = "traced-mode"
    for model in (ref_model, new_model) if quiet else ():
        quiet_dropout(model)
    return ref_model, new_model, inputs, mode


def _step(model: torch.nn.Module, inputs: tuple[Any, ...], seed: int
          ) -> tuple[Any, list[torch.Tensor], dict[str, torch.Tensor]] | None:
    """One forward and backward of a seeded random projection of the outputs: the outputs,
    the input gradients and the parameter gradients; None when no output needs grad."""
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point())
               if isinstance(x, torch.Tensor) else x for x in inputs)
    out = run(model, xs, seed)
    leaves = [o for o in _leaves(out) if o.requires_grad]
    if not leaves:
        return None
    gen = torch.Generator().manual_seed(seed + 2)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in leaves)
    input_grads, param_grads = _gradients(model, loss, xs)
    return out, input_grads, param_grads


def _gradients(model: torch.nn.Module, loss: torch.Tensor, xs: tuple[Any, ...]
               ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients of ``loss`` for the inputs and the parameters that get one, taken
    with ``torch.autograd.grad``, not ``backward``: no parameter's ``.grad`` is written
    (the copies share their parameters with the caller's models)."""
    wanted = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*wanted, *(p for _, p in params)], allow_unused=True)
    input_grads = [g for g in grads[:len(wanted)] if g is not None]
    param_grads = {k: g for (k, _), g in zip(params, grads[len(wanted):]) if g is not None}
    return input_grads, param_grads


def _first_names(named: Any) -> dict[str, str]:
    """Every name of a tensor reachable under several (one module assigned to two
    attributes, ``nn.ModuleList([layer] * 3)``) -> its first name, the one
    ``named_parameters()`` reports: tensors are matched by identity, not by spelling."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in named}


def _renamed(values: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``values`` keyed by the original's first name of each tensor."""
    return {names.get(k, k): v for k, v in values.items()}


def _param_check(mode: str, ref_model: torch.nn.Module, new_model: torch.nn.Module,
                 ref_grads: dict[str, torch.Tensor], new_grads: dict[str, torch.Tensor],
                 weight_map: WeightMap, rtol: float | None, atol: float | None) -> Check:
    """Parameter gradients and floating buffers after the step, the fused model's mapped
    back to the original's keys, summed up in one check (worst error over all keys)."""
    params = _first_names(ref_model.named_parameters(remove_duplicate=False))
    mapped = _renamed(weight_map.to_original(new_grads, strict=False), params)
    lost = sorted(set(ref_grads) ^ set(mapped))
    if lost:
        raise VerificationError(f"{mode} gradients: {lost[0]} gets a gradient in only one of "
                                "the two models", check=f"{mode} param grads")
    common = sorted(set(ref_grads) & set(mapped))
    per_key = [compare(f"{mode} grad of {k}", ref_grads[k], mapped[k], rtol, atol)
               for k in common]
    buffers_ref = dict(ref_model.named_buffers())
    buffers_new = _renamed(weight_map.to_original(dict(new_model.named_buffers()), strict=False),
                           _first_names(ref_model.named_buffers(remove_duplicate=False)))
    shared = sorted(k for k in set(buffers_ref) & set(buffers_new)
                    if buffers_ref[k].is_floating_point())
    if shared:
        per_key += [compare(f"{mode} buffer {k} after the step", buffers_ref[k], buffers_new[k],
                            rtol, atol) for k in shared]
    return Check(f"{mode} param grads and buffers ({len(common) + len(shared)})",
                 max((c.max_abs for c in per_key), default=0.0),
                 max((c.max_rel for c in per_key), default=0.0))


def _train_step_checks(original: torch.nn.Module, fused: torch.nn.Module,
                       inputs: tuple[Any, ...], weight_map: WeightMap, seed: int,
                       rtol: float | None, atol: float | None, skipped: list[str],
                       dtype: torch.dtype | None) -> list[Check]:
    """One train-mode forward/backward of both models (cast to ``dtype`` when given):
    outputs, input gradients, parameter gradients and buffers after the step."""
    ref_model, new_model, inputs, mode = _train_copies(original, fused, inputs, dtype)
    random_ops = random_nodes(new_model)
    if random_ops:
        skipped.append(f"gradients: the model calls {random_ops[0]} (random) in train mode")
        return []
    if draws_hidden_random(ref_model, inputs, seed):
        return _aligned_step_checks(original, fused, inputs, weight_map, seed, rtol, atol,
                                    skipped, dtype)
    return _step_checks(ref_model, new_model, inputs, weight_map, seed, rtol, atol, skipped,
                        mode)


def _aligned_step_checks(original: torch.nn.Module, fused: torch.nn.Module,
                         inputs: tuple[Any, ...], weight_map: WeightMap, seed: int,
                         rtol: float | None, atol: float | None, skipped: list[str],
                         dtype: torch.dtype | None) -> list[Check]:
    """The train step when the original draws random numbers that cannot be switched off:
    both models run with their dropout on, from one RNG seed, so the same draws meet the
    same tensors. When the draws cannot be aligned (the rewrite draws once for rows the
    loop drew one by one), the step is skipped with a note instead of refused."""
    ref_model, new_model, inputs, mode = _train_copies(original, fused, inputs, dtype,
                                                       quiet=False)
    try:
        checks = _step_checks(ref_model, new_model, inputs, weight_map, seed, rtol, atol,
                              skipped, mode)
    except VerificationError as exc:
        skipped.append(f"{mode} outputs and gradients: the original draws random numbers in "
                       f"{mode} mode that cannot be switched off, and the two models' draws "
                       f"could not be aligned under one seed ({exc.check}); not compared")
        return []
    skipped.append(f"{mode} step compared with dropout on, both models from one RNG seed "
                   "(the original draws random numbers that cannot be switched off)")
    return checks


def _step_checks(ref_model: torch.nn.Module, new_model: torch.nn.Module,
                 inputs: tuple[Any, ...], weight_map: WeightMap, seed: int,
                 rtol: float | None, atol: float | None, skipped: list[str],
                 mode: str) -> list[Check]:
    """One forward/backward of each prepared copy, compared."""
    steps = []
    for model in (ref_model, new_model):
        try:
            step = _step(model, inputs, seed)
        except RuntimeError as exc:
            if model is new_model:
                raise
            # The original cannot take a gradient step itself (two in-place ReLUs on one
            # tensor, say): there is nothing to compare the rewrite's gradients with.
            skipped.append(f"{mode} gradients: the original model's own backward fails "
                           f"({one_line(exc)}); gradients not compared")
            return []
        if step is None:
            skipped.append("gradients: the output does not require grad")
            return []
        steps.append(step)
    (ref_out, ref_inputs, ref_params), (new_out, new_inputs, new_params) = steps
    return [compare(f"{mode} outputs", ref_out, new_out, rtol, atol),
            compare(f"{mode} input grads", ref_inputs, new_inputs, rtol, atol),
            _param_check(mode, ref_model, new_model, ref_params, new_params, weight_map,
                         rtol, atol)]
