"""Check that a rewritten model computes what the original did. Knows nothing of matching.

Three checks: outputs on the example inputs; outputs on fresh random inputs with a
different batch size; in train mode, outputs and gradients (inputs and parameters,
the fused parameters' gradients mapped back through the :class:`WeightMap`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import VerificationError
from ..rewrite.weights import WeightMap

log = logging.getLogger("fxfuse")

# rtol, and atol as a fraction of the reference's largest magnitude. Reordered sums in a
# grouped kernel move the last bits; a wrong layout moves everything.
_TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5),
               torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, relative atol) used for ``dtype``."""
    return _TOLERANCES.get(dtype, (1e-4, 1e-5))


@dataclass(frozen=True)
class Check:
    """One comparison: what was compared and how far apart it was (``max_rel`` is the
    largest absolute error over the reference's largest magnitude, at least 1)."""

    name: str
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class VerifyReport:
    """Every check that ran and every check that was skipped (with why)."""

    checks: tuple[Check, ...]
    skipped: tuple[str, ...] = ()

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.checks), default=0.0)


def _leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def compare(name: str, ref: Any, got: Any, rtol: float | None = None,
            atol: float | None = None) -> Check:
    """Compare two (nested) results tensor by tensor.

    Raises:
        VerificationError: shapes differ or a value is out of tolerance.
    """
    refs, gots = _leaves(ref), _leaves(got)
    if len(refs) != len(gots):
        raise VerificationError(f"{name}: the rewritten model returns {len(gots)} tensors, "
                                f"the original {len(refs)}", check=name)
    worst_abs = worst_rel = 0.0
    for r, g in zip(refs, gots):
        if r.shape != g.shape or r.dtype != g.dtype:
            raise VerificationError(f"{name}: output {tuple(g.shape)} {g.dtype} differs from "
                                    f"the original's {tuple(r.shape)} {r.dtype}", check=name)
        if r.numel() == 0:
            continue
        r64, g64 = r.detach().double(), g.detach().double()
        diff = (r64 - g64).abs()
        scale = max(1.0, float(r64.abs().max()))
        d_rtol, d_atol = tolerances(r.dtype)
        rt = d_rtol if rtol is None else rtol
        at = d_atol * scale if atol is None else atol
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / scale)
        if bool((diff > at + rt * r64.abs()).any()) or not torch.equal(r.isnan(), g.isnan()):
            raise VerificationError(
                f"the rewrite changes the numbers ({name}): max abs error {worst_abs:.3g}, max "
                f"rel error {worst_rel:.3g} (rtol {rt:g}, atol {at:.3g}); the rewrite is refused",
                max_abs=worst_abs, max_rel=worst_rel, check=name)
    return Check(name, worst_abs, worst_rel)


def _fresh_inputs(inputs: Sequence[Any], batch: int, gen: torch.Generator) -> tuple[Any, ...]:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            shape = (batch, *x.shape[1:])
            if x.is_floating_point():
                out.append(torch.randn(shape, generator=gen, dtype=torch.float32)
                           .to(device=x.device, dtype=x.dtype))
            else:
                rows = torch.randint(0, x.shape[0], (batch,), generator=gen)
                out.append(x[rows.to(x.device)])
        else:
            out.append(x)
    return tuple(out)


def _run(model: Callable, inputs: Sequence[Any], seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(*inputs)


def verify_models(original: torch.nn.Module, fused: torch.nn.Module, example_inputs: Sequence[Any],
                  *, weight_map: WeightMap | None = None, check_grads: bool = True,
                  rtol: float | None = None, atol: float | None = None,
                  seed: int = 0) -> VerifyReport:
    """Compare ``fused`` against ``original``; raise on the first mismatch.

    Args:
        original: the reference model (not modified; train-mode checks use copies).
        fused: the rewritten model (not modified either).
        example_inputs: the inputs the model was traced with.
        weight_map: maps the fused model's parameter names back to the original's, so
            parameter gradients can be compared.
        check_grads: also compare gradients in train mode.
        rtol, atol: override the per-dtype tolerances.

    Returns:
        A :class:`VerifyReport` with the worst absolute and relative errors.

    Raises:
        VerificationError: a check failed; carries ``max_abs``, ``max_rel``, ``check``.
    """
    inputs = tuple(example_inputs)
    checks, skipped = [], []
    # Copies: a train-mode forward updates BatchNorm statistics, and the caller's
    # models must come out of verification as they went in.
    to_eval = fused.training and bool(_random_nodes(fused))
    original, fused = _copy_for_checks(original, to_eval), _copy_for_checks(fused, to_eval)
    if to_eval:
        skipped.append("outputs compared in eval mode: the model calls a random op in train mode")
    with torch.no_grad():
        checks.append(compare("example inputs", _run(original, inputs, seed),
                              _run(fused, inputs, seed), rtol, atol))
        first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
        if first is None:
            skipped.append("other batch size: no batched tensor input")
        else:
            gen = torch.Generator().manual_seed(seed + 1)
            batch = first.shape[0] + 1
            other = _fresh_inputs(inputs, batch, gen)
            try:
                ref = _run(original, other, seed)
            except Exception as exc:  # noqa: BLE001 - the model itself is batch-specific
                skipped.append(f"batch {batch}: the original model does not run on it ({exc})")
            else:
                checks.append(compare(f"batch {batch}", ref, _guard(fused, other, seed, batch),
                                      rtol, atol))
    if check_grads:
        checks.extend(_grad_checks(original, fused, inputs, weight_map or WeightMap(),
                                   seed, rtol, atol, skipped))
    report = VerifyReport(tuple(checks), tuple(skipped))
    log.info("verified: max abs %.3g, max rel %.3g", report.max_abs, report.max_rel)
    return report


def _quiet_dropout(model: torch.nn.Module) -> None:
    """Dropout draws different masks when applied once to all rows than row by row; the
    checks run it as identity, in both models alike, so everything else is compared."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()


def _copy_for_checks(model: torch.nn.Module, to_eval: bool) -> torch.nn.Module:
    model = copy.deepcopy(model)
    _quiet_dropout(model)
    if to_eval:
        try:
            model.eval()
        except Exception:  # noqa: BLE001 - exported graphs keep their mode
            pass
    return model


_RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
           "rand", "randn", "rand_like", "randn_like", "bernoulli", "native_dropout"}


def _random_nodes(model: torch.nn.Module) -> list[str]:
    """Functional random ops in a graph (their draws depend on how rows are batched)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    found = []
    for node in graph.nodes:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op in ("call_function", "call_method") and name in _RANDOM:
            training = node.kwargs.get("training", node.kwargs.get("train", True))
            if training is not False:
                found.append(node.name)
    return found


def _guard(model: Callable, inputs: Sequence[Any], seed: int, batch: int) -> Any:
    try:
        return _run(model, inputs, seed)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"the rewritten model fails on batch {batch} where the original "
                                f"runs: {exc}", check=f"batch {batch}") from exc


def _grad_checks(original: torch.nn.Module, fused: torch.nn.Module, inputs: tuple[Any, ...],
                 weight_map: WeightMap, seed: int, rtol: float | None, atol: float | None,
                 skipped: list[str]) -> list[Check]:
    try:
        return _train_step_checks(original, fused, inputs, weight_map, seed, rtol, atol,
                                  skipped, None)
    except VerificationError as refusal:
        # A gradient that cancels to ~0 (a conv bias before a train-mode BatchNorm, say)
        # carries rounding noise far above its own size. Run the step again in float64:
        # only a difference that survives there is a real one.
        if rtol is not None or atol is not None or "grad" not in refusal.check:
            raise
        try:
            checks = _train_step_checks(original, fused, inputs, weight_map, seed, rtol, atol,
                                        [], torch.float64)
        except Exception:  # noqa: BLE001 - float64 disagrees or cannot run: keep the refusal
            raise refusal from None
        skipped.append(f"gradients compared in float64: in the model's dtype, rounding noise "
                       f"exceeded the tolerance ({refusal.check}, {refusal.max_abs:.3g})")
        return checks


def _train_step_checks(original: torch.nn.Module, fused: torch.nn.Module,
                       inputs: tuple[Any, ...], weight_map: WeightMap, seed: int,
                       rtol: float | None, atol: float | None, skipped: list[str],
                       dtype: torch.dtype | None) -> list[Check]:
    """One train-mode forward/backward of both models (cast to ``dtype`` when given):
    outputs, input gradients, parameter gradients and buffers after the step."""
    ref_model, new_model = copy.deepcopy(original), copy.deepcopy(fused)
    if dtype is not None:
        ref_model, new_model = ref_model.to(dtype), new_model.to(dtype)
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in inputs)
    try:
        ref_model.train()
        new_model.train()
        mode = "train"
    except Exception:  # noqa: BLE001 - exported graphs keep the mode they were traced in
        mode = "traced-mode"
    for model in (ref_model, new_model):
        _quiet_dropout(model)
    random_ops = _random_nodes(new_model)
    if random_ops:
        skipped.append(f"gradients: the model calls {random_ops[0]} (random) in train mode")
        return []
    results = []
    grads = []
    for model in (ref_model, new_model):
        xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point())
                   if isinstance(x, torch.Tensor) else x for x in inputs)
        out = _run(model, xs, seed)
        leaves = [o for o in _leaves(out) if o.requires_grad]
        if not leaves:
            skipped.append("gradients: the output does not require grad")
            return []
        gen = torch.Generator().manual_seed(seed + 2)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in leaves)
        loss.backward()
        input_grads = [x.grad for x in xs if isinstance(x, torch.Tensor) and x.grad is not None]
        param_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results.append(out)
        grads.append((input_grads, param_grads))
    checks = [compare(f"{mode} outputs", results[0], results[1], rtol, atol),
              compare(f"{mode} input grads", grads[0][0], grads[1][0], rtol, atol)]
    mapped = weight_map.to_original(grads[1][1], strict=False)
    lost = sorted(set(grads[0][1]) ^ set(mapped))
    if lost:
        raise VerificationError(f"{mode} gradients: {lost[0]} gets a gradient in only one of "
                                "the two models", check=f"{mode} param grads")
    common = sorted(set(grads[0][1]) & set(mapped))
    per_key = [compare(f"{mode} grad of {k}", grads[0][1][k], mapped[k], rtol, atol)
               for k in common]
    buffers_ref = dict(ref_model.named_buffers())
    buffers_new = weight_map.to_original(dict(new_model.named_buffers()), strict=False)
    shared = sorted(k for k in set(buffers_ref) & set(buffers_new)
                    if buffers_ref[k].is_floating_point())
    if shared:
        per_key += [compare(f"{mode} buffer {k} after the step", buffers_ref[k], buffers_new[k],
                            rtol, atol) for k in shared]
    checks.append(Check(f"{mode} param grads and buffers ({len(common) + len(shared)})",
                        max((c.max_abs for c in per_key), default=0.0),
                        max((c.max_rel for c in per_key), default=0.0)))
    return checks
