"""Dynamo's spelling of per-row ops, rewritten into the spelling the matcher reads.

Dynamo inlines ``nn.BatchNorm1d`` into ``F.batch_norm(x, running_mean, running_var,
weight, bias, training, momentum, eps)``; the matcher reads eval-mode BatchNorm as the
exported ``aten.batch_norm(x, weight, bias, running_mean, running_var, training,
momentum, eps, cudnn_enabled)``. Same op, same numbers: only the call is respelt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training",
             "momentum", "eps")
_BN_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)


def respell_for_matching(gm: fx.GraphModule) -> int:
    """Rewrite eval-mode ``F.batch_norm`` calls of ``gm`` as ``aten.batch_norm`` (in
    place); returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = dict(zip(_BN_NAMES, _BN_DEFAULTS))
        args.update(zip(_BN_NAMES, node.args))
        args.update({k: v for k, v in node.kwargs.items() if k in args})
        if args["training"] is not False:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.aten.batch_norm.default, (
                args["input"], args["weight"], args["bias"], args["running_mean"],
                args["running_var"], False, args["momentum"], args["eps"], True))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
