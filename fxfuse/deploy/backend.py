"""``torch.compile(model, backend="fxfuse")``: the pass on each graph Dynamo captures.

Dynamo hands a backend one ``GraphModule`` per captured region, spelt its own way:
inputs ``l_x_``, per-row modules inlined into ``torch.conv1d`` calls, and (torch 2.5 on)
every parameter and buffer lifted into a graph input. The backend turns those lifted
weights into ``get_attr`` reads of the same tensors, so the matcher sees the functional
per-row-weight spelling it knows; runs find / rewrite / verify (once per captured graph:
Dynamo caches what a backend returns, and recompiles call it again); puts the weights it
did not fuse back as graph inputs, and hands the graph to the inner backend (Inductor
by default) with the calling convention unchanged.

The fused weights are copies. They are refreshed from the model's own parameters when
those change in place (an optimiser step, ``load_state_dict``: their version counters
move). A graph captured with gradients on is handed on unchanged: gradients would reach
the copies, not the model's parameters. Compile for inference under ``torch.no_grad()``
or ``torch.inference_mode()``.

Example::

    compiled = torch.compile(model, backend="fxfuse")            # Inductor after the pass
    compiled = torch.compile(model, backend=fxfuse.backend(inner="eager"))
    compiled = torch.compile(model, backend="fxfuse", options={"inner": "eager"})
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx

from ..check.verify import VerifyReport, verify_models
from ..errors import ConfigError
from ..config import FuseConfig
from ..passes.driver import run_pass
from ..match.kinds.conv import conv_call
from ..match.sites import RowSite
from ..weightmap import WeightMap
from ..trace.tracing import _RecordingShapeProp
from .spelling import respell_for_matching

log = logging.getLogger("fxfuse")

_WEIGHT_SOURCES = ("._parameters[", "._buffers[")


@dataclass(frozen=True)
class CompiledGraph:
    """What the backend did with one captured graph.

    Attributes:
        sites: the loop sites found (with what was done or why not).
        convs_before: 1-D convolution calls in the captured graph.
        convs_after: the same in the graph handed to the inner backend.
        verification: the numerical checks, ``None`` when nothing was rewritten.
        unchanged_because: why the graph was handed on as captured; ``""`` if rewritten.
        graph: the GraphModule handed to the inner backend.
    """

    sites: tuple[RowSite, ...]
    convs_before: int
    convs_after: int
    verification: VerifyReport | None
    unchanged_because: str
    graph: fx.GraphModule

    @property
    def changed(self) -> bool:
        return not self.unchanged_because


def count_convs(gm: fx.GraphModule) -> int:
    """Number of 1-D convolution calls (module or functional) in ``gm``'s graph."""
    return sum(1 for n in gm.graph.nodes if conv_call(n, gm) is not None
               or (n.op == "call_function" and n.target in (torch.conv1d,
                                                            torch.nn.functional.conv1d)))


@dataclass(frozen=True)
class BackendOptions:
    """Options of the fxfuse backend (also accepted as ``torch.compile(options=...)``).

    Attributes:
        inner: the backend that compiles the rewritten graph: a registered name
            (``"inductor"``, ``"eager"``, ``"aot_eager"``, ...) or a backend callable.
        lowering: ``"auto"`` (measured per site), ``"grouped"`` or ``"grouped2d"``.
        verify: compare each rewritten graph with the captured one before using it.
        min_rows: leave loops with fewer rows alone.
    """

    inner: str | Callable[..., Any] = "inductor"
    lowering: str = "auto"
    verify: bool = True
    min_rows: int = 2


class FxFuseBackend:
    """A Dynamo backend: fxfuse's pass, then an inner backend. ``graphs`` records each
    graph compiled (newest last, the last 32 kept)."""

    __name__ = "fxfuse"

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options or BackendOptions()
        self.graphs: list[CompiledGraph] = []

    def __repr__(self) -> str:
        return f"fxfuse.backend({self.options})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                 options: dict[str, Any] | None = None, mode: str | None = None) -> Callable:
        opts = _merge(self.options, options)
        if mode not in (None, "default"):
            log.warning("fxfuse backend: mode=%r is not passed on; name an inner backend "
                        "instead", mode)
        inner = _lookup(opts.inner)
        # Outside Dynamo's tracing context: shapes are propagated and loops timed on real
        # tensors, and no size is read through Dynamo's symbols (that would specialise it).
        with torch._guards.tracing(None):
            record, refresh = _fuse_graph(gm, [_concrete(v) for v in example_inputs], opts)
        self.graphs = (self.graphs + [record])[-32:]
        log.info("fxfuse backend: %d -> %d conv calls%s", record.convs_before,
                 record.convs_after, f" ({record.unchanged_because})"
                 if record.unchanged_because else "")
        compiled = inner(record.graph, list(example_inputs))
        return compiled if refresh is None else refresh.wrap(compiled)


def backend(gm: fx.GraphModule | None = None, example_inputs: Sequence[Any] | None = None,
            **options: Any) -> Any:
    """The fxfuse Dynamo backend, configured or applied.

    ``fxfuse.backend(inner="eager", lowering="grouped")`` returns a backend to pass to
    ``torch.compile(model, backend=...)``; ``fxfuse.backend(gm, example_inputs)`` is the
    backend itself, with the default options.

    Args:
        gm: a captured graph (when Dynamo calls it).
        example_inputs: its inputs.
        **options: fields of :class:`BackendOptions` (``inner``, ``lowering``,
            ``verify``, ``min_rows``).

    Returns:
        A :class:`FxFuseBackend`, or the compiled callable when ``gm`` is given.
    """
    made = FxFuseBackend(_merge(BackendOptions(), options))
    if gm is None:
        return made
    return made(gm, example_inputs or [])


def _merge(base: BackendOptions, options: dict[str, Any] | None) -> BackendOptions:
    if not options:
        return base
    fields = {f.name for f in dataclasses.fields(BackendOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown fxfuse backend option {unknown[0]!r}; options are "
                          f"{', '.join(sorted(fields))}")
    return dataclasses.replace(base, **options)


def _lookup(inner: str | Callable[..., Any]) -> Callable[..., Any]:
    if inner in ("fxfuse", fxfuse_backend) or isinstance(inner, FxFuseBackend):
        raise ConfigError("the fxfuse backend cannot be its own inner backend; name "
                          "'inductor', 'eager' or another backend")
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(inner)


class _Refresh:
    """Copies the model's current weights into the fused ones when any changed in place."""

    def __init__(self, gm: fx.GraphModule, weights: dict[str, torch.Tensor],
                 weight_map: WeightMap) -> None:
        self.gm, self.map = gm, weight_map
        self.watched = {k: weights[k] for e in weight_map.entries for k in e.parts}
        self.versions = {k: t._version for k, t in self.watched.items()}

    def stale(self) -> bool:
        return any(t._version != self.versions[k] for k, t in self.watched.items())

    def refresh(self) -> None:
        fused = self.map.to_fused({k: t.detach() for k, t in self.watched.items()})
        own = dict(self.gm.named_parameters()) | dict(self.gm.named_buffers())
        with torch.no_grad():
            for key, value in fused.items():
                if key in own:
                    own[key].copy_(value)
        self.versions = {k: t._version for k, t in self.watched.items()}
        log.info("fxfuse backend: weights changed in place; fused copies refreshed")

    def wrap(self, compiled: Callable) -> Callable:
        def run(*args: Any) -> Any:
            if self.stale():
                self.refresh()
            return compiled(*args)
        return run


def _concrete(value: Any) -> Any:
    """A symbolic size as the int it has now, read without adding a guard (evaluating
    it would specialise Dynamo's graph to this one size)."""
    if not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value
    hint = getattr(value.node, "hint", None)
    if hint is None:
        from torch.fx.experimental import symbolic_shapes
        hint = symbolic_shapes.optimization_hint(value)
    return type(hint)(hint) if not isinstance(hint, (int, float, bool)) else hint


def _weight_placeholders(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[fx.Node, Any]:
    """Placeholders that are the model's lifted parameters and buffers → their tensors."""
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if isinstance(getattr(source, "name", None), str) else ""
        if isinstance(value, torch.Tensor) and (
                isinstance(value, torch.nn.Parameter) or any(s in name for s in _WEIGHT_SOURCES)):
            found[node] = value
    return found


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _unchanged(gm: fx.GraphModule, sites: tuple[RowSite, ...], convs: int,
               why: str) -> tuple[CompiledGraph, None]:
    return CompiledGraph(sites, convs, convs, None, why, gm), None


def _fuse_graph(gm: fx.GraphModule, example_inputs: list[Any],
                opts: BackendOptions) -> tuple[CompiledGraph, _Refresh | None]:
    """The captured graph rewritten (or as it was, with the reason)."""
    convs = count_convs(gm)
    weights = _weight_placeholders(gm, example_inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in weights.values()):
        return _unchanged(gm, (), convs, "captured with gradients on; compile under "
                          "torch.no_grad() or torch.inference_mode() to fuse")
    work = _copy_graph(gm)
    attrs = _weights_as_attrs(work, gm, weights)
    respell_for_matching(work)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _RecordingShapeProp(work).propagate(*example_inputs)
        config = FuseConfig(lowering=opts.lowering, min_rows=opts.min_rows, verify=False,
                            benchmark=False)
        dynamic = any(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                      for v in example_inputs)
        # A graph with size inputs (a dynamic capture) is left to the kinds; in a static
        # one the lifted weights are no batch.
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        batched = tuple(n not in weights for n in placeholders)
        result = run_pass(work, tuple(example_inputs), config, structural=not dynamic,
                          batched=batched)
        sites, wmap = result.sites, result.weight_map
        if not any(s.fusable for s in sites):
            return _unchanged(gm, sites, convs, "no fusable loop")
        if not result.changed:
            return _unchanged(gm, sites, convs, "auto kept every loop (no rewrite was faster)")
        _attrs_as_inputs(work, attrs)
        verification = _verify(gm, work, example_inputs, weights) if opts.verify else None
    except Exception as exc:  # noqa: BLE001 - a failed pass must not fail the user's compile
        log.warning("fxfuse backend: graph handed on unchanged: %s: %s",
                    type(exc).__name__, exc)
        return _unchanged(gm, (), convs, f"{type(exc).__name__}: {exc}")
    refresh = _Refresh(work, {a: t for a, (_, t) in attrs.items()}, wmap)
    return CompiledGraph(sites, convs, count_convs(work), verification, "", work), refresh


def _weights_as_attrs(work: fx.GraphModule, gm: fx.GraphModule,
                      weights: dict[fx.Node, Any]) -> dict[str, tuple[str, torch.Tensor]]:
    """Read each lifted weight through ``get_attr`` of the same tensor (the matcher's
    functional spelling); the placeholder stays, unused. Returns attr → (placeholder, tensor)."""
    by_name = {n.name: n for n in work.graph.nodes if n.op == "placeholder"}
    last = [n for n in work.graph.nodes if n.op == "placeholder"][-1]
    attrs = {}
    for node, tensor in weights.items():
        attr = f"fxfuse_w_{node.name}"
        if isinstance(tensor, torch.nn.Parameter):
            work.register_parameter(attr, tensor)
        else:
            work.register_buffer(attr, tensor)
        with work.graph.inserting_after(last):
            read = work.graph.get_attr(attr)
        read.meta = dict(by_name[node.name].meta)
        by_name[node.name].replace_all_uses_with(read)
        attrs[attr] = (node.name, tensor)
    return attrs


def _attrs_as_inputs(work: fx.GraphModule, attrs: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Weights left unfused are read from the graph inputs again (live, with gradients)."""
    by_name = {n.name: n for n in work.graph.nodes if n.op == "placeholder"}
    for node in list(work.graph.nodes):
        if node.op == "get_attr" and node.target in attrs:
            node.replace_all_uses_with(by_name[attrs[node.target][0]])
            work.graph.erase_node(node)
    for attr in attrs:
        if hasattr(work, attr):
            delattr(work, attr)
    work.graph.lint()
    work.recompile()


class _Bound(torch.nn.Module):
    """A captured graph with its weight inputs fixed: called with the user inputs only."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], user: list[int]) -> None:
        super().__init__()
        self.gm, self.fixed, self.user = gm, list(example_inputs), user

    def forward(self, *inputs: Any) -> Any:
        args = list(self.fixed)
        for i, value in zip(self.user, inputs):
            args[i] = value
        return self.gm(*args)

    def __deepcopy__(self, memo: dict) -> "_Bound":
        # Dynamo's node meta holds fake tensors, which cannot be copied: drop it.
        gm = _copy_graph(self.gm)
        for node in gm.graph.nodes:
            node.meta = {}
        fixed = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in self.fixed]
        return _Bound(copy.deepcopy(gm, memo), fixed, self.user)


def _verify(original: fx.GraphModule, fused: fx.GraphModule, example_inputs: list[Any],
            weights: dict[fx.Node, Any]) -> VerifyReport:
    """Captured vs rewritten graph on the user inputs and another batch size."""
    placeholders = [n for n in original.graph.nodes if n.op == "placeholder"]
    user = [i for i, n in enumerate(placeholders) if n not in weights]
    inputs = [example_inputs[i] for i in user]
    return verify_models(_Bound(original, example_inputs, user),
                         _Bound(fused, example_inputs, user), inputs, check_grads=False)


fxfuse_backend = FxFuseBackend()
"""The default backend instance (Inductor after the pass): the ``torch_dynamo_backends``
entry point ``fxfuse`` and what ``torch.compile(model, backend="fxfuse")`` calls."""


def register() -> None:
    """Make ``backend="fxfuse"`` work without the installed entry point."""
    from torch._dynamo.backends import registry
    with contextlib.suppress(Exception):
        registry.list_backends(exclude_tags=())      # loads entry points first
    if "fxfuse" not in registry._BACKENDS:
        registry.register_backend(fxfuse_backend, name="fxfuse")


register()
