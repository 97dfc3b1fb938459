"""GPU check: buffer models allocating on the GPU (.cuda(), .to(x.device)) and
last-axis feature Linears fuse on the default path and agree with the original."""
import sys, torch
sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests")]
import fxfuse
from torch import nn
from zoo.realcode import DecompLinear, ZerosLikeConv, NumericEmbedding, SliceEmbedding, GroupedFeatureLinear

class CudaBuffer(nn.Module):
    def __init__(self, n=4, d=6):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
    def forward(self, x):
        out = torch.zeros(x.shape[0], x.shape[1], 6).cuda()
        for i, h in enumerate(self.heads):
            out[:, i, :] = h(x[:, i, :])
        return out.permute(0, 2, 1)

print(torch.__version__, torch.cuda.get_device_name())
cases = [("cuda()", CudaBuffer, (8, 4, 6)), ("zeros_to", lambda: DecompLinear(alloc="zeros_to"), (8, 24, 5)),
         ("new_zeros", lambda: DecompLinear(alloc="new_zeros"), (8, 24, 5)),
         ("empty_type_as", lambda: DecompLinear(alloc="empty_type_as"), (8, 24, 5)),
         ("zeros_like", ZerosLikeConv, (8, 6, 20)), ("numeric", NumericEmbedding, (8, 7, 5)),
         ("slice", SliceEmbedding, (8, 7, 4)), ("kblocks", GroupedFeatureLinear, (8, 7, 12))]
bad = 0
for name, f, shape in cases:
    for train in (False, True):
        for lowering in ("auto", "grouped"):
            try:
                torch.manual_seed(0)
                m = f().cuda().train(train)
                r = fxfuse.fuse(m, (torch.randn(shape, device="cuda"),), benchmark=False, lowering=lowering)
                r.model.eval(); m.eval()
                x2 = torch.randn((5,) + shape[1:], device="cuda")
                err = (r.model(x2) - m(x2)).abs().max().item()
                print(name, train, lowering, [s.lowering or s.reason for s in r.sites], f"{err:.1e}")
            except Exception as e:
                bad += 1
                print(name, train, lowering, "ERR", type(e).__name__, str(e).splitlines()[0][:200])
print("failures", bad)
