"""The real-code models (tests/zoo/realcode.py) through the default path: sites fused,
reasons, conv/matmul calls before -> after, max error at another batch size."""
import sys, traceback
import torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests")]
import fxfuse
from zoo.realcode import CASES

HEAVY = {"convolution", "mm", "addmm", "bmm", "baddbmm", "addbmm", "_convolution",
         "mkldnn_convolution", "native_layer_norm", "addcmul"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in {"convolution", "mm", "addmm", "bmm", "baddbmm", "addbmm"}:
            self.n += 1
        return func(*args, **(kwargs or {}))


def calls(model, inputs):
    with torch.no_grad(), Count() as c:
        model(*inputs)
    return c.n


def leaves(v):
    if isinstance(v, torch.Tensor): return [v]
    if isinstance(v, dict): return [t for x in v.values() for t in leaves(x)]
    if isinstance(v, (list, tuple)): return [t for x in v for t in leaves(x)]
    return []


DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
rows = []
for name, factory, make, _ in CASES:
    for mode in ("eval", "train"):
        torch.manual_seed(0)
        m = factory().train(mode == "train").to(DEVICE)
        x = tuple(t.to(DEVICE) for t in make(4))
        try:
            r = fxfuse.fuse(m, x, benchmark=False)
            fused = sum(s.fused for s in r.sites)
            reasons = "; ".join(sorted({s.reason for s in r.sites if not s.fused and s.reason}))[:110]
            x2 = tuple(t.to(DEVICE) for t in make(3))
            m.eval(); r.model.eval()
            ref, got = leaves(m(*x2)), leaves(r.model(*x2))
            err = max(((a - b).abs().max().item() for a, b in zip(ref, got)), default=0.0)
            rows.append((name, mode, f"{fused}/{len(r.sites)}", f"{calls(m, x2)}->{calls(r.model, x2)}", f"{err:.1e}", reasons))
        except Exception as e:
            rows.append((name, mode, "ERR", "", "", f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
for r in rows:
    print(" | ".join(r))
