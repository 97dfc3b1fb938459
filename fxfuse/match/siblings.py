"""Sibling Linear layers: several ``nn.Linear`` (or ``F.linear`` with attribute weights)
applied to the very same input, each output used on its own (``q, k, v = self.q(x),
self.k(x), self.v(x)``; two heads ``mu``/``logvar`` on one hidden state). They become one
Linear with the output features concatenated, each user reading its slice.

Found after the row loops (:func:`fxfuse.match.find.find_row_sites`); Linear calls that
belong to a row loop are left to it. The sites are ordinary :class:`RowSite` records with
``loop_kind == "siblings"``; the graph is not touched here.
"""
from __future__ import annotations

from collections import Counter
from typing import Collection, Sequence

import torch
from torch import fx, nn

from .sites import RowMatch, RowSite

KIND = "siblings"
_FLINEAR = (torch.nn.functional.linear, torch._C._nn.linear)


def _param(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None or not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return value


def _linear_of(gm: fx.GraphModule, node: fx.Node, x: fx.Node):
    """(weight key, bias key or None, weight, bias) when ``node`` is a plain Linear of
    ``x`` that may be fused; else None."""
    if node.op == "call_module":
        return _module_linear(gm, node, x)
    if node.op == "call_function" and node.target in _FLINEAR:
        return _function_linear(gm, node, x)
    return None


def _module_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node):
    """:func:`_linear_of` for a ``call_module`` node."""
    if node.args != (x,) or node.kwargs:
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is not nn.Linear or _hooked(mod):
        return None
    if not isinstance(mod.weight, nn.Parameter):
        return None
    return (f"{node.target}.weight", None if mod.bias is None else f"{node.target}.bias",
            mod.weight, mod.bias)


def _hooked(mod: nn.Module) -> bool:
    """Whether ``mod`` has hooks or parametrizations that a fused Linear would lose."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks
                or getattr(mod, "_backward_hooks", None) or mod._state_dict_hooks
                or torch.nn.utils.parametrize.is_parametrized(mod))


def _function_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node):
    """:func:`_linear_of` for an ``F.linear`` call with attribute weights."""
    a = node.args
    if not a or a[0] is not x or set(node.kwargs) - {"weight", "bias"}:
        return None
    w_node = a[1] if len(a) > 1 else node.kwargs.get("weight")
    b_node = a[2] if len(a) > 2 else node.kwargs.get("bias")
    w = _param(gm, w_node)
    b = _param(gm, b_node)
    if w is None or (b_node is not None and b is None):
        return None
    if len(w_node.users) != 1 or (b_node is not None and len(b_node.users) != 1):
        return None
    return (w_node.target, None if b_node is None else b_node.target, w, b)


def _calls(gm: fx.GraphModule) -> Counter:
    """How often each module path is called and each attribute read."""
    seen: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            seen[node.target] += 1
    return seen


def find_sibling_sites(gm: fx.GraphModule, sites: Sequence[RowSite] = (), *,
                       min_rows: int = 2, claimed: Collection[fx.Node] = (),
                       first: int | None = None) -> list[RowSite]:
    """Groups of at least ``min_rows`` fusable Linear layers reading one input.

    Linears of one input fuse together when they agree in ``in_features``,
    ``out_features`` (the weight map splits a ``cat`` into equal parts), having a bias,
    dtype, device and ``requires_grad``; their parameters must not be used anywhere else
    (each module called once, each parameter held once in the model, no hooks or
    parametrizations). Groups that do not qualify are not reported. Linears in
    ``sites`` or in ``claimed`` are not taken; sites are named from ``first`` on (after
    ``sites`` by default).
    """
    taken = _taken(sites)
    calls = _calls(gm)
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    owners = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
    found: list[RowSite] = []
    start = len(sites) if first is None else first
    for x in gm.graph.nodes:
        buckets: dict[tuple, list[tuple[fx.Node, tuple]]] = {}
        for user in x.users:
            if user.name in taken or user in claimed:
                continue
            info = _linear_of(gm, user, x)
            if info is None:
                continue
            wkey, bkey, w, b = info
            if not _exclusive(user, calls, attrs, owners, w, b):
                continue
            if not _uniform(w, b):
                continue
            key = (w.shape[1], w.shape[0], b is not None, w.dtype, str(w.device), w.requires_grad)
            buckets.setdefault(key, []).append((user, info))
        for key, members in buckets.items():
            if len(members) < max(2, min_rows):
                continue
            members.sort(key=lambda m: _order(gm, m[0]))
            found.append(_sibling_site(f"site{start + len(found)}", x, members))
    return found


def _taken(sites: Sequence[RowSite]) -> set:
    """Names of the nodes already claimed by the row-loop sites."""
    return {n for s in sites for n in (*s.convs, *(m for c in s.chains for m in c))}


def _exclusive(user: fx.Node, calls: Counter, attrs: list, owners: Counter,
               w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the Linear's module/attributes are used once and its parameters held once."""
    if user.op == "call_module" and (calls[user.target] != 1 or any(
            str(t).startswith(f"{user.target}.") for t in attrs)):
        return False      # the module is called again, or its weight read directly
    if user.op == "call_function" and any(
            calls[a.target] != 1 for a in user.all_input_nodes if a.op == "get_attr"):
        return False
    if any(owners[id(p)] != 1 for p in (w, b) if p is not None):
        return False      # tied or shared parameters
    return True


def _uniform(w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether weight and bias have Linear shapes and agree in dtype, device and grad."""
    if w.dim() != 2 or (b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0])):
        return False
    if b is not None and (b.dtype != w.dtype or b.device != w.device
                          or b.requires_grad != w.requires_grad):
        return False
    return True


def _sibling_site(name: str, x: fx.Node, members: list) -> RowSite:
    """The site record for one ordered group of sibling Linears reading ``x``."""
    names = tuple(n.name for n, _ in members)
    targets = tuple(n.target if n.op == "call_module" else info[0]
                    for n, info in members)
    steps = tuple(f"linear {info[2].shape[1]}→{info[2].shape[0]}" for _, info in members)
    match = RowMatch(name=name, combine=names[0],
                     combine_kind=KIND, source=x.name, convs=names, targets=targets,
                     chains=tuple((n,) for n in names), steps=steps,
                     groups=(tuple(range(len(names))),), family="linear",
                     loop_kind=KIND)
    return RowSite(match)


def _order(gm: fx.GraphModule, node: fx.Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    return -1


def with_siblings(gm: fx.GraphModule, sites: Sequence[RowSite], *,
                  min_rows: int = 2) -> tuple[RowSite, ...]:
    """``sites`` followed by the sibling-Linear sites of ``gm``."""
    return (*sites, *find_sibling_sites(gm, sites, min_rows=min_rows))
