"""Verification under reduced-precision modes (TF32 on CUDA), simulated on the CPU.

A "TF32 rewrite" is the fused model with its fused conv's input and output rounded to
TF32's 10-bit mantissa in float32 (what cuDNN does when it picks TF32 for the grouped
conv while the loop ran in full float32). It must pass when the settings allow TF32 and
be refused when they do not; a broken rewrite is refused in both.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
import fxfuse.passes.kinds
from fxfuse.check import precision
from fxfuse.check.precision import (PrecisionMode, detect_precision, emulate_tf32, full_precision,
                                    round_to_tf32)
from fxfuse.check.verify import permitted_error

from zoo import spellings as M

TF32 = PrecisionMode("cuda", conv_tf32=True)
FULL = PrecisionMode("cuda")


def _st_round(t: torch.Tensor) -> torch.Tensor:
    """Rounded to TF32 in float32 (straight-through for gradients); other dtypes as is."""
    if t.dtype != torch.float32:
        return t
    return t + (round_to_tf32(t.detach()) - t.detach())


def _as_tf32(gm: nn.Module) -> nn.Module:
    """The fused model as TF32 runs it: fused conv operands and result rounded."""
    gm = copy.deepcopy(gm)
    for name, module in gm.named_modules():
        if name.endswith("_fused"):
            module.register_forward_pre_hook(lambda mod, args: tuple(_st_round(a) for a in args))
            module.register_forward_hook(lambda mod, args, out: _st_round(out))
    return gm


def _fused(model: nn.Module, x: torch.Tensor) -> fxfuse.FuseResult:
    return fxfuse.fuse(model, (x,), lowering="grouped", verify=False, benchmark=False)


def _shift_rows(gm: nn.Module, rows: int) -> nn.Module:
    """A wrong weight order: the fused conv's row blocks rolled by one row."""
    gm = copy.deepcopy(gm)
    fused = next(m for n, m in gm.named_modules() if n.endswith("_fused"))
    with torch.no_grad():
        w = fused.weight.clone()
        fused.weight.copy_(w.view(rows, -1, *w.shape[1:]).roll(1, 0).view_as(w))
    return gm


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.randn(1000) * 100
    r = round_to_tf32(x)
    assert bool(((r.view(torch.int32) & 0x1FFF) == 0).all())
    rel = ((r - x).abs() / x.abs()).max().item()
    assert 0 < rel <= 2.0 ** -11
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    assert torch.equal(round_to_tf32(special)[:2], special[:2])
    assert round_to_tf32(special)[2].isnan() and round_to_tf32(special)[3] == 0


def test_emulate_tf32_rounds_conv_operands():
    x, w = torch.randn(2, 8, 20), torch.randn(4, 8, 3)
    with emulate_tf32():
        got = F.conv1d(x, w)
    assert torch.equal(got, F.conv1d(round_to_tf32(x), round_to_tf32(w)))
    assert not torch.equal(got, F.conv1d(x, w))
    with emulate_tf32(PrecisionMode("cuda", matmul_tf32=True)):   # convs left alone
        assert torch.equal(F.conv1d(x, w), F.conv1d(x, w.clone()))


def test_detect_precision_reads_the_settings():
    assert detect_precision("cpu") == PrecisionMode("cpu")
    with full_precision():          # restores every flag after, whatever the test sets
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        mode = detect_precision(torch.device("cuda", 0))
        assert mode.conv_tf32 and not mode.matmul_tf32
        assert mode.reduced_for(torch.float32) == "TF32"
        assert mode.reduced_for(torch.float64) is None
        assert mode.describe().startswith("cuda: TF32 convolutions")
        assert mode.fp16_reduction == \
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.set_float32_matmul_precision("high")
        assert detect_precision("cuda").matmul_tf32


def test_tf32_rewrite_accepted_when_tf32_is_allowed():
    model = M.Seed()
    x = model.example()
    result = _fused(model, x)
    rounded = _as_tf32(result.model)
    report = fxfuse.verify_models(model, rounded, (x,), weight_map=result.weight_map,
                                  precision=TF32)
    assert "TF32" in report.precision
    assert any("ran in TF32 where the original ran at full precision" in n
               for n in report.notes)
    assert report.max_abs > 1e-5        # the rounding is really there


def test_tf32_rewrite_refused_when_tf32_is_not_allowed():
    model = M.Seed()
    x = model.example()
    result = _fused(model, x)
    with pytest.raises(fxfuse.VerificationError):
        fxfuse.verify_models(model, _as_tf32(result.model), (x,),
                             weight_map=result.weight_map, precision=FULL)


@pytest.mark.parametrize("mode", [TF32, FULL], ids=["tf32", "full"])
@pytest.mark.parametrize("breakage", ["weight", "shifted-rows"])
def test_broken_rewrite_refused_in_every_mode(mode, breakage):
    model = M.Seed()
    x = model.example()
    result = _fused(model, x)
    if breakage == "weight":
        broken = copy.deepcopy(result.model)
        fused = next(m for n, m in broken.named_modules() if n.endswith("_fused"))
        with torch.no_grad():
            fused.weight[0, 0, 0] += 0.05
    else:
        broken = _shift_rows(result.model, x.shape[2])
    with pytest.raises(fxfuse.VerificationError) as info:
        fxfuse.verify_models(model, _as_tf32(broken), (x,), weight_map=result.weight_map,
                             precision=mode)
    assert "refused" in str(info.value)


def test_fuse_detects_the_mode_and_reports_it(monkeypatch):
    """The default path reads the mode (injected here) and the report shows it."""
    monkeypatch.setattr(precision, "detect_precision", lambda device: TF32)
    original = fxfuse.passes.kinds.rewrite_site

    def tf32_rewrite(gm, site, lowering="grouped", **kw):
        wmap = original(gm, site, lowering, **kw)
        module = gm.get_submodule(wmap.entries[0].fused_key.rpartition(".")[0])
        module.register_forward_hook(lambda mod, args, out: _st_round(out))
        return wmap

    monkeypatch.setattr(fxfuse.passes.kinds, "rewrite_site", tf32_rewrite)
    model = M.Seed()
    result = fxfuse.fuse(model, (model.example(),), lowering="grouped", benchmark=False)
    assert result.verification.precision == TF32.describe()
    assert "precision" in result.report() and "TF32" in result.report()
    assert result.to_dict()["verification"]["notes"]
    monkeypatch.setattr(precision, "detect_precision", lambda device: FULL)
    with pytest.raises(fxfuse.VerificationError):
        fxfuse.fuse(model, (model.example(),), lowering="grouped", benchmark=False)


def test_user_tolerances_are_not_widened_by_the_mode():
    model = M.Seed()
    x = model.example()
    result = _fused(model, x)
    with pytest.raises(fxfuse.VerificationError):
        fxfuse.verify_models(model, _as_tf32(result.model), (x,), rtol=1e-6, atol=1e-7,
                             check_grads=False, precision=TF32)


def test_permitted_error_follows_the_mode():
    """The self-check bound (benchmarks): the float tolerance at full precision, what
    TF32 permits the loop under TF32 — a TF32 grouped conv fits it, a broken one does not."""
    model = M.Seed().eval()
    x = model.example(4)
    result = _fused(model, x)
    full = permitted_error(model, (x,), precision=FULL)
    tf32 = permitted_error(model, (x,), precision=TF32)
    assert tf32 > 2 * full
    want = model(x)
    with torch.no_grad():
        err = (_as_tf32(result.model)(x) - want).abs().max().item()
        broken_err = (_as_tf32(_shift_rows(result.model, model.H))(x) - want).abs().max().item()
    assert full < err <= tf32 < broken_err
