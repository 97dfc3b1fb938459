"""Read a conv call's settings and check that its weights may move into a fused conv."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx

from .ops import ConvCall
from .sites import ConvSpec


def get_tensor(root: torch.nn.Module, key: str) -> torch.Tensor:
    """The parameter or buffer at dotted path ``key``."""
    owner, _, name = key.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    return getattr(mod, name)


def conv_spec(root: torch.nn.Module, call: ConvCall) -> ConvSpec:
    """The settings of one conv call, read from its weight and arguments."""
    weight = get_tensor(root, call.weight_key)
    return ConvSpec(
        in_channels=int(weight.shape[1]) * call.groups, out_channels=int(weight.shape[0]),
        kernel_size=int(weight.shape[2]), stride=call.stride, padding=call.padding,
        dilation=call.dilation, groups=call.groups, bias=call.bias_key is not None,
        padding_mode=call.padding_mode, dtype=weight.dtype, device=str(weight.device))


class WeightUses:
    """Which graph nodes use each weight tensor (by identity, so tied weights count)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.users: dict[int, set[fx.Node]] = defaultdict(set)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                for tensor in gm.get_submodule(str(node.target)).parameters():
                    self.users[id(tensor)].add(node)
            elif node.op == "get_attr":
                self.users[id(get_tensor(gm, str(node.target)))].update(node.users)

    def outside_problem(self, root: torch.nn.Module, keys: list[str],
                        site_convs: set[fx.Node]) -> str:
        """Why moving these weights would untie them from another user, or ``""``."""
        for key in keys:
            others = self.users.get(id(get_tensor(root, key)), set()) - site_convs
            if others:
                other = sorted(others, key=lambda n: n.name)[0]
                return (f"{key} is also used by `{other.name}` outside the loop; "
                        "fusing would untie that weight")
        return ""
