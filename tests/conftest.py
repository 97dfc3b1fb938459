"""Shared helpers for the pass's tests: run ``fuse`` and check what it did, three ways.

``check(model, inputs, expect_fused)`` asserts
  * how many sites were fused and how many were left alone (each with a reason);
  * the structure of the new graph: one new ``Conv1d`` (``Conv2d`` for ``grouped2d``) per
    fused site with ``groups == rows * conv_groups``, called once, and none of the
    site's per-row convs (modules, weights, calls) left;
  * the numbers: eval-mode outputs on fresh random inputs of another batch size than
    traced, then train-mode outputs and gradients (inputs and parameters, the fused
    parameters mapped back through the weight map), all against the *original* model.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import pytest
import torch
from torch import fx, nn

import fxfuse

# The tests run tiny convolutions by the thousand; on a shared 2-core machine a second
# intra-op thread only adds synchronisation (60x slower per call when the cores are busy).
torch.set_num_threads(1)

# (rtol, atol) per dtype for the tests' own comparisons.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
              torch.bfloat16: (5e-2, 5e-2), torch.float64: (1e-9, 1e-9)}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def fresh_inputs(inputs: Sequence[Any], batch: int, seed: int = 1) -> tuple[Any, ...]:
    """Random tensors shaped like ``inputs`` but with ``batch`` rows on dim 0."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch, *x.shape[1:]), generator=gen).to(x.dtype)
                 if isinstance(x, torch.Tensor) else x for x in inputs)


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaves(v)]
    return []


def set_mode(model: nn.Module, train: bool) -> nn.Module:
    """``model.train(train)``; exported graphs keep the mode they were traced in."""
    try:
        model.train(train)
    except (NotImplementedError, RuntimeError):
        pass
    return model


# Auto's per-site timing in the tests: the real timing code, few rounds.
AUTO_ROUNDS = 2


def check(model: nn.Module, inputs: Sequence[Any], expect_fused: int, expect_left: int = 0,
          lowering: str | None = None, *, batch: int | None = None, grads: bool = True,
          **options: Any) -> fxfuse.FuseResult:
    """Fuse ``model`` and check counts, structure and numerics (see the module doc).

    With no ``lowering`` the model goes through the default path (``lowering="auto"``,
    whose choice is not asserted, only exactness). When auto keeps a loop, the structure
    is checked on a forced ``"grouped"`` run as well, so it is always checked.
    """
    inputs = tuple(inputs)
    options.setdefault("benchmark", False)
    if lowering is None or lowering == "auto":
        options.setdefault("auto_rounds", AUTO_ROUNDS)
        result = fxfuse.fuse(model, inputs, **options)
        lowering = "auto"
    else:
        result = fxfuse.fuse(model, inputs, lowering=lowering, **options)
    check_counts(result, expect_fused, expect_left, lowering)
    check_structure(result, model, inputs)
    traced_batch = inputs[0].shape[0]
    other = fresh_inputs(inputs, batch or traced_batch + 2)
    assert other[0].shape[0] != traced_batch
    check_outputs(model, result.model, other)
    if grads:
        check_grads(model, result.model, other, result.weight_map)
    if lowering == "auto" and any(s.lowering == "loop" for s in result.sites):
        options.pop("auto_rounds")
        check(model, inputs, expect_fused, expect_left, "grouped", batch=batch, grads=grads,
              **options)
    return result


def check_counts(result: fxfuse.FuseResult, expect_fused: int, expect_left: int,
                 lowering: str = "grouped") -> None:
    kept = [s for s in result.sites if s.lowering == "loop"]   # "auto" found the loop fastest
    fused = [s for s in result.sites if s.fused]
    left = [s for s in result.sites if not s.fused and s not in kept]
    summary = "; ".join(f"{s.name}: {s.reason or s.lowering}" for s in result.sites)
    assert len(fused) + len(kept) == expect_fused, summary
    assert len(left) == expect_left, summary
    assert not kept or lowering == "auto", summary
    for site in left:
        assert site.reason, f"{site.name} left alone without a reason"
    for site in fused:
        assert not site.reason and site.rows >= 2 and site.spec is not None
        expected = "batched" if site.shared_module else lowering
        assert site.lowering == expected or lowering == "auto", summary


def new_conv_modules(gm: fx.GraphModule, original: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv modules called by ``gm`` (or whose weight it reads: ``im2col``) that the
    original model does not have."""
    old = dict(original.named_modules())
    used = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] + \
        [str(n.target).rpartition(".")[0] for n in gm.graph.nodes
         if n.op == "get_attr" and str(n.target).endswith(".weight")]
    return [(t, gm.get_submodule(t)) for t in used if t not in old
            and isinstance(gm.get_submodule(t), (nn.Conv1d, nn.Conv2d))]


def _calls(gm: fx.GraphModule, target: str) -> int:
    """How many nodes call the conv at ``target`` (a module, or a weight attribute)."""
    weights = {target, target + ".weight"}
    return sum(1 for n in gm.graph.nodes
               if (n.op == "call_module" and n.target == target) or
               (n.op == "call_function" and any(a.op == "get_attr" and a.target in weights
                                                for a in n.all_input_nodes)))


def check_structure(result: fxfuse.FuseResult, original: nn.Module,
                    inputs: Sequence[Any]) -> None:
    gm = result.model
    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
    fused = [s for s in result.sites if s.fused]
    new = new_conv_modules(gm, original)
    if all(_single_conv(site) for site in fused):
        expected = [conv for site in fused for conv in _expected_convs(site, original)]
        got = [(type(mod).__name__, mod.groups, mod.in_channels) for _, mod in new]
        assert sorted(got) == sorted(expected), gm.code
    for site in fused:
        if _single_conv(site) and len(site.groups) <= 1 and not site.shared_module:
            spec = site.spec
            assert any(m.out_channels == site.rows * spec.out_channels for _, m in new)
    assert len({name for name, _ in new}) == len(new), "a fused conv is called more than once"
    state = gm.state_dict()
    for site in fused:
        targets = set(site.targets)
        if site.shared_module:
            traced = fxfuse.trace_model(copy.deepcopy(original), inputs, tracer=result.tracer)
            target = site.targets[0]
            assert _calls(gm, target) == _calls(traced, target) - site.rows + 1, \
                f"{site.name}: the shared conv is still called per row\n{gm.code}"
            continue
        for node in gm.graph.nodes:
            target = str(node.target)
            assert not (node.op in ("call_module", "get_attr") and
                        (target in targets or target.rpartition(".")[0] in targets)), \
                f"{site.name}: per-row conv `{target}` still in the graph\n{gm.code}"
        left = [k for k in state for t in targets if k == t or k.startswith(t + ".")]
        assert not left, f"{site.name}: per-row weights kept: {left}"


def _single_conv(site: fxfuse.RowSite) -> bool:
    """One conv per row (no tower, no reduction): the pass's core case."""
    return all(len(chain) == 1 for chain in site.chains) and not site.reduce


def _expected_convs(site: fxfuse.RowSite, original: nn.Module) -> list[tuple[str, int, int]]:
    """(class, groups, in_channels) of the one new conv per group of equal rows."""
    if site.shared_module:
        return []
    cls = nn.Conv2d if site.lowering == "grouped2d" else nn.Conv1d
    spec = site.spec
    groups = site.groups or (tuple(range(site.rows)),)
    return [(cls.__name__, len(g) * spec.groups, len(g) * spec.in_channels) for g in groups]


def check_outputs(original: nn.Module, fused: nn.Module, inputs: Sequence[Any]) -> None:
    """Eval-mode outputs of ``fused`` and ``original`` agree on ``inputs``."""
    ref_model = set_mode(copy.deepcopy(original), False)
    new_model = set_mode(copy.deepcopy(fused), False)
    with torch.no_grad():
        ref, got = ref_model(*inputs), new_model(*inputs)
    for r, g in zip(leaves(ref), leaves(got), strict=True):
        torch.testing.assert_close(g, r, **tolerance(r.dtype))
        check_layout(g, r)


def check_layout(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` is exactly as contiguous as ``want``; a contiguous ``want``'s strides are
    ``got``'s too (on every dim of size > 1). A non-contiguous original output's strides
    are the model's own business (a ``movedim`` view, say) and not compared."""
    assert got.is_contiguous() == want.is_contiguous(), (got.stride(), want.stride())
    if not want.is_contiguous():
        return
    strides = [(g, w) for g, w, n in zip(got.stride(), want.stride(), want.shape) if n > 1]
    assert all(g == w for g, w in strides), (got.stride(), want.stride())


def check_grads(original: nn.Module, fused: nn.Module, inputs: Sequence[Any],
                weight_map: fxfuse.WeightMap) -> None:
    """Train-mode outputs, input gradients and parameter gradients agree."""
    results = []
    for model in (original, fused):
        model = set_mode(copy.deepcopy(model), True)
        xs = tuple(x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x
                   for x in inputs)
        out = leaves(model(*xs))
        gen = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum() for o in out)
        loss.backward()
        params = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results.append((out, [x.grad for x in xs if isinstance(x, torch.Tensor)], params))
    (ref_out, ref_in, ref_params), (out, in_grads, params) = results
    tol = tolerance(ref_out[0].dtype)
    for r, g in zip(ref_out, out, strict=True):
        torch.testing.assert_close(g, r, **tol)
    for r, g in zip(ref_in, in_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)
    mapped = weight_map.to_original(params, strict=False)   # frozen weights have no grad
    assert sorted(mapped) == sorted(ref_params)
    for key, grad in ref_params.items():
        torch.testing.assert_close(mapped[key], grad, **tol, msg=lambda m, k=key: f"{k}: {m}")


def assert_left_alone(model: nn.Module, inputs: Sequence[Any], *reason_words: str,
                      **options: Any) -> fxfuse.RowSite:
    """The one loop of ``model`` is found, not fused, with a reason naming the cause; the
    output model computes exactly what the original does."""
    options.setdefault("benchmark", False)
    result = fxfuse.fuse(model, inputs, **options)
    assert len(result.sites) == 1, [s.reason for s in result.sites]
    site = result.sites[0]
    assert not site.fused and not result.changed
    assert site.reason and "\n" not in site.reason
    for word in reason_words:
        assert word in site.reason, site.reason
    assert not new_conv_modules(result.model, model), result.model.code
    other = fresh_inputs(inputs, inputs[0].shape[0] + 2)
    with torch.no_grad():
        ref, got = model.eval()(*other), set_mode(result.model, False)(*other)
    for r, g in zip(leaves(ref), leaves(got), strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    return site


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _vectorised_rows_timed_on_a_fake_clock(monkeypatch) -> None:
    """``auto``'s timing of a vectorised loop against its rows runs both (a broken
    rewrite still raises) on a fake clock where the loop wins: no test's outcome
    depends on this machine's load. Tests of auto choosing ``vmap`` use
    :func:`helpers.vmap_wins`."""
    import fxfuse.passes.step as step
    from helpers import TimingSwitch
    monkeypatch.setattr(step, "choose_among", TimingSwitch())
