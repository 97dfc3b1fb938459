"""Verification under the device's precision modes, on CUDA: fuse with verification on
(TF32 as shipped, matmul TF32 on, TF32 off, float16, bfloat16) and check that a broken
rewrite is still refused. Prints one line per case.

    python benchmarks/verify_precision_gpu.py [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback

import torch
from torch import nn

import fxfuse
from fxfuse.check.precision import detect_precision
from fxfuse.check.verify import permitted_error
from fxfuse.examples import RowConv1d
from fxfuse.check.precision import matmul_precision  # noqa: E402


class Heads(nn.Module):
    """Per-variable Linear heads: ``stack([h(x[:, i]) for i, h in enumerate(heads)], 1)``."""

    def __init__(self, v: int = 32, length: int = 512, p: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(length, p) for _ in range(v))

    def forward(self, x):
        return torch.stack([h(x[:, i]) for i, h in enumerate(self.heads)], 1)


def _broken(result: fxfuse.FuseResult, how: str) -> nn.Module:
    gm = copy.deepcopy(result.model)
    fused = next(m for n, m in gm.named_modules() if n.endswith("_fused"))
    with torch.no_grad():
        if how == "weight":
            fused.weight[0, 0, 0] += 0.05
        else:                                   # rows shifted by one
            rows = result.sites[0].rows
            w = fused.weight.clone()
            fused.weight.copy_(w.view(rows, -1, *w.shape[1:]).roll(1, 0).view_as(w))
    return gm


def case(label: str, model: nn.Module, x: torch.Tensor, broken: bool = True) -> None:
    t0 = time.perf_counter()
    try:
        result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
        v = result.verification
        print(f"{label}: ACCEPTED max_abs {v.max_abs:.3g} | {v.precision} | batches "
              f"{v.batch_sizes} refused {v.batch_refused} | modes {v.modes}")
        for note in v.notes:
            print(f"    note: {note}")
        for s in v.skipped:
            print(f"    skipped: {s}")
    except fxfuse.VerificationError as exc:
        print(f"{label}: REFUSED {exc}")
        return
    except Exception:  # noqa: BLE001
        print(f"{label}: ERROR {traceback.format_exc().splitlines()[-1]}")
        return
    try:
        print(f"    permitted_error(loop) = {permitted_error(model, (x,)):.3g}")
    except Exception:  # noqa: BLE001
        print(f"    permitted_error failed: {traceback.format_exc().splitlines()[-1]}")
    if broken:
        for how in ("weight", "rows"):
            try:
                fxfuse.verify_models(model, _broken(result, how), (x,),
                                     weight_map=result.weight_map)
                print(f"    broken ({how}): ACCEPTED  <-- WRONG")
            except fxfuse.VerificationError as exc:
                print(f"    broken ({how}): refused ({exc.check}, max_abs {exc.max_abs:.3g})")
            except Exception:  # noqa: BLE001
                print(f"    broken ({how}): ERROR {traceback.format_exc().splitlines()[-1]}")
    print(f"    ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    dev = parser.parse_args().device
    print(torch.__version__, torch.cuda.get_device_name() if dev == "cuda" else dev)
    print("settings:", detect_precision(dev).describe(),
          "| matmul precision", matmul_precision())
    torch.manual_seed(0)
    seed = RowConv1d().to(dev).eval()
    x = torch.randn(32, 15, 10, 100, device=dev)
    case("seed fp32 (defaults)", seed, x)
    case("H=64 fp32 (defaults)", RowConv1d(15, 64).to(dev).eval(),
         torch.randn(32, 15, 64, 100, device=dev))
    case("16 x Conv1d(64,64,5) fp32 (defaults)", RowConv1d(64, 16, 5).to(dev).eval(),
         torch.randn(32, 64, 16, 256, device=dev))
    case("seed fp32 train mode (defaults)", RowConv1d().to(dev).train(), x)
    heads = Heads().to(dev).eval()
    xh = torch.randn(64, 32, 512, device=dev)
    case("Linear heads fp32 (defaults)", heads, xh, broken=False)
    torch.backends.cuda.matmul.allow_tf32 = True
    print("settings:", detect_precision(dev).describe())
    case("Linear heads fp32 (matmul TF32 on)", heads, xh, broken=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print("settings:", detect_precision(dev).describe())
    case("seed fp32 (TF32 off)", seed, x)
    torch.backends.cudnn.allow_tf32 = True
    for dtype in (torch.float16, torch.bfloat16):
        case(f"seed {dtype} (defaults)", copy.deepcopy(seed).to(dtype), x.to(dtype))
    try:
        sys.path.insert(0, "benchmarks")
        from models import self_check
        self_check(dev)
        print("benchmarks self_check on", dev, ": ok")
    except Exception:  # noqa: BLE001
        print("benchmarks self_check:", traceback.format_exc().splitlines()[-1])


if __name__ == "__main__":
    main()
