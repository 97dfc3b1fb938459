"""Helpers for the pass's tests (imported by the tests themselves, not from conftest)."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

import fxfuse


def fuse(model: nn.Module, x: torch.Tensor, lowering: str = "grouped") -> fxfuse.FuseResult:
    """``fxfuse.fuse`` on one input, no timing."""
    return fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False)


def assert_same(model: nn.Module, result: fxfuse.FuseResult, x: torch.Tensor, train: bool) -> None:
    """Outputs, gradients and buffers after one step agree with the original's."""
    ref, new = copy.deepcopy(model).train(train), copy.deepcopy(result.model).train(train)
    for m in (ref, new):
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.eval()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [ref(xs[0]), new(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    grads = result.weight_map.to_original({k: p.grad for k, p in new.named_parameters()},
                                          strict=False)
    for key, p in ref.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, rtol=1e-4, atol=1e-4)
    state = result.weight_map.to_original(new.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def assert_map_round_trip(model: nn.Module, result: fxfuse.FuseResult) -> None:
    """The weight map carries the original state_dict to the fused one and back, bit for
    bit, and survives JSON (the map read back from JSON holds the same entries)."""
    from fxfuse.weightmap import WeightMap
    again = WeightMap.from_json(result.weight_map.to_json())
    assert again.entries == result.weight_map.entries
    for wm in (result.weight_map, again):
        original, fused = model.state_dict(), result.model.state_dict()
        there = wm.to_fused(original)
        assert sorted(there) == sorted(fused)
        assert all(torch.equal(there[k], fused[k]) for k in fused)
        back = wm.to_original(fused)
        assert sorted(back) == sorted(original)
        assert all(torch.equal(back[k], original[k]) for k in original)


def module_types(gm: fx.GraphModule) -> list[str]:
    """The types of the modules ``gm`` calls, in graph order."""
    return [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes
            if n.op == "call_module" and n.target != "_guards_fn"]   # torch.export's own


def call_sequence(gm: fx.GraphModule) -> list[str]:
    """The graph as a list of what each node calls: method names, function names, module
    types (``permute``, ``layer_norm``, ``Conv1d``)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(str(n.target))).__name__)
        elif n.op == "call_method":
            out.append(str(n.target))
        elif n.op == "call_function":
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


class FakeAutoClock:
    """``auto`` on a fake clock: every candidate still runs (a broken rewrite still
    raises), but a rewrite's call costs half the loop's fake seconds, so the default
    path's choice is the rule's, never the machine's load."""

    def __init__(self, loop_s: float = 1e-3, rewrite_s: float = 0.5e-3) -> None:
        self.now, self.loop_s, self.rewrite_s = 0.0, loop_s, rewrite_s

    def __call__(self) -> float:
        return self.now

    def choose_among(self, calls, **kw):
        from fxfuse.check.decide import choose_among

        def timed(name, call):
            def run():
                call()
                self.now += self.loop_s if name == "loop" else self.rewrite_s
            return run
        kw.update(clock=self, round_s=0.0)
        return choose_among({k: timed(k, c) for k, c in calls.items()}, **kw)


class TimingSwitch:
    """Stands in for the pass's ``choose_among`` (installed by ``conftest``): a loop's
    timing against its vectorised form alone goes to ``vmap``, on a fake clock where the
    loop wins unless a test says otherwise; the kinds' timing goes to ``kinds`` (real
    unless a test sets a fake), without the ``vmap`` candidate unless ``kinds_vmap``."""

    def __init__(self) -> None:
        from fxfuse.check.decide import choose_among
        self.kinds = choose_among
        self.vmap = FakeAutoClock(loop_s=1e-3, rewrite_s=2e-3).choose_among
        self.kinds_vmap = False

    def __call__(self, calls, **kw):
        if set(calls) <= {"loop", "vmap"}:
            return self.vmap(calls, **kw)
        if not self.kinds_vmap:
            calls = {k: v for k, v in calls.items() if k != "vmap"}
        return self.kinds(calls, **kw)


def timing_switch() -> TimingSwitch:
    """The :class:`TimingSwitch` the pass times with in this test."""
    import fxfuse.passes.step as step
    return step.choose_among


def time_kinds_with(monkeypatch, fake) -> None:
    """Time the kinds' candidates with ``fake`` (a ``choose_among``), through the pass
    and through :func:`fxfuse.check.auto.choose_lowering` alike."""
    import fxfuse.check.auto as auto
    monkeypatch.setattr(auto, "choose_among", fake)
    monkeypatch.setattr(timing_switch(), "kinds", fake)


def rewrites_win(monkeypatch) -> FakeAutoClock:
    """Make ``auto`` choose a rewrite deterministically (see :class:`FakeAutoClock`)."""
    clock = FakeAutoClock()
    time_kinds_with(monkeypatch, clock.choose_among)
    return clock


def vmap_wins(monkeypatch) -> FakeAutoClock:
    """Make ``auto`` choose the vectorised form of a loop of identical rows (a rewrite's
    call costs half the loop's on a fake clock)."""
    clock = FakeAutoClock()
    monkeypatch.setattr(timing_switch(), "vmap", clock.choose_among)
    return clock
