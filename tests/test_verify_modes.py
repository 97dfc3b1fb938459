"""Verification is right where the returned model will run: non-finite values, batch
sizes other than traced, the other train/eval mode, outputs that must not share memory,
bad arguments, and a caller's model and tensors left as they were."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.check.verify import compare

from zoo import spellings as M


def _fuse(model, *inputs, **kw):
    kw.setdefault("benchmark", False)
    return fxfuse.fuse(model, inputs, **kw)


# ------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize("ref, got", [
    ([1.0, float("inf")], [1.0, 0.0]),
    ([1.0, 0.0], [1.0, float("inf")]),
    ([float("inf"), 1.0], [-float("inf"), 1.0]),
    ([float("nan"), 1.0], [1.0, float("nan")]),
    ([float("nan"), 1.0], [0.0, 1.0]),
], ids=["inf-vs-0", "0-vs-inf", "sign", "nan-moved", "nan-vs-0"])
def test_non_finite_values_must_match_exactly(ref, got):
    with pytest.raises(fxfuse.VerificationError) as info:
        compare("outputs", torch.tensor(ref), torch.tensor(got))
    assert "refused" in str(info.value) and "\n" not in str(info.value)


def test_matching_non_finite_values_pass_and_finite_ones_are_compared():
    ref = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    assert compare("outputs", ref, ref.clone()).max_abs == 0
    with pytest.raises(fxfuse.VerificationError):
        compare("outputs", ref, torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0]))


def test_all_nan_output_is_reported_not_error_zero():
    nan = torch.full((3,), float("nan"))
    with pytest.raises(fxfuse.VerificationError, match="all NaN"):
        compare("outputs", nan, nan.clone())


def test_nan_weights_are_reported():
    model = M.Seed().eval()
    with torch.no_grad():
        model.layers[1].weight.fill_(float("nan"))
    with pytest.raises(fxfuse.VerificationError, match="layers.1.weight holds NaN"):
        _fuse(model, model.example(), lowering="grouped")


# ------------------------------------------------------------------ API arguments, caller's state

@pytest.mark.parametrize("inputs", [None, 3, "x", {"x": 1}])
def test_bad_example_inputs_are_a_config_error(inputs):
    with pytest.raises(fxfuse.ConfigError, match="example_inputs"):
        fxfuse.fuse(M.Seed(), inputs)


@pytest.mark.parametrize("kwargs", [{"config": "grouped"}, {"config": {"lowering": "grouped"}}])
def test_bad_config_argument_is_a_config_error(kwargs):
    with pytest.raises(fxfuse.ConfigError, match="config must be a (fxfuse.)?FuseConfig"):
        fxfuse.fuse(M.Seed(), (M.Seed().example(),), **kwargs)


class WritesInput(M.Seed):
    """A forward that scales its input in place (a common shortcut)."""

    def forward(self, x):
        x.mul_(2)
        return super().forward(x)


def test_example_inputs_are_never_modified():
    model = WritesInput().eval()
    x = model.example()
    before = x.clone()
    result = _fuse(model, x)
    assert torch.equal(x, before)
    fresh = model.example(3)
    torch.testing.assert_close(result.model(fresh.clone()), model(fresh.clone()))


class BNRows(M.RowLoop):
    """Rows through a BatchNorm shared by all of them, in train mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(self.C_out)

    def forward(self, x):
        return self.bn(torch.stack([l(x[:, :, h]) for h, l in enumerate(self.layers)], 2))


def test_failed_inplace_call_leaves_parameters_and_buffers(monkeypatch):
    model = BNRows().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refuse(reference, fused, inputs, **kwargs):
        """Fault injection: a failure after the shared modules have run and changed
        (``inplace=True`` works on the caller's own modules)."""
        fused(*inputs)                          # train-mode BatchNorm: statistics move
        with torch.no_grad():
            fused.get_submodule("bn").weight.add_(1.0)
        raise fxfuse.VerificationError("refused for the test", check="test")

    monkeypatch.setattr(fxfuse.api, "verify_models", refuse)
    with pytest.raises(fxfuse.VerificationError):
        _fuse(model, model.example(), lowering="grouped", inplace=True)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ------------------------------------------------------------------ batch sizes

class BatchOne(M.Seed):
    def forward(self, x):
        N, C, H, L = x.shape
        y = super().forward(x)
        return y * 2 if N == 1 else y


class BatchAboveFour(M.Seed):
    def forward(self, x):
        N, C, H, L = x.shape
        y = super().forward(x)
        return y * 2 if N > 4 else y


def test_batch_one_is_checked():
    model = BatchOne().eval()
    with pytest.raises(fxfuse.VerificationError, match="batch 1"):
        _fuse(model, model.example(), lowering="grouped")


def test_batch_range_is_narrowed_and_stated():
    model = BatchAboveFour().eval()
    result = _fuse(model, model.example(), lowering="grouped")
    report = result.verification
    assert result.tracer == "export"
    assert 1 in report.batch_sizes and 2 in report.batch_sizes
    assert report.batch_refused and min(report.batch_refused) > 4
    assert max(report.batch_sizes) <= 4
    assert result.to_dict()["verification"]["batch_refused"] == list(report.batch_refused)


def test_checked_batch_sizes_are_on_the_report():
    model = M.Seed().eval()
    report = _fuse(model, model.example(3)).verification
    if report is not None:             # auto may keep the loop: nothing to verify
        assert report.batch_sizes == (1, 3, 8, 9)
    report = _fuse(model, model.example(3), lowering="grouped").verification
    assert report.batch_sizes == (1, 3, 8, 9) and report.batch_refused == ()


# ------------------------------------------------------------------ train and eval

class TrainBranch(M.Seed):
    """Clamps only in eval mode: a symbolic trace fixes whichever branch it saw."""

    def forward(self, x):
        y = super().forward(x)
        if self.training:
            return y
        return y.clamp(-0.1, 0.1)


def test_other_mode_is_checked_for_train_mode_models():
    model = TrainBranch().train()
    with pytest.raises(fxfuse.VerificationError, match="eval mode"):
        _fuse(model, model.example(), lowering="grouped")


def test_other_mode_is_checked_for_eval_mode_models_without_grad_check():
    model = TrainBranch().eval()
    with pytest.raises(fxfuse.VerificationError, match="train mode"):
        _fuse(model, model.example(), lowering="grouped", check_grads=False)


def test_both_modes_reported_when_both_agree():
    model = M.Seed().train()
    report = _fuse(model, model.example(), lowering="grouped").verification
    assert set(report.modes) == {"train", "eval"}
    assert "eval mode" in [c.name for c in report.checks]


# ------------------------------------------------------------------ aliased outputs

class RowAndStack(nn.Module):
    """Returns the stacked rows and the first row by itself."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x):
        outs = [layer(x[:, i]) for i, layer in enumerate(self.layers)]
        return torch.stack(outs, 1), outs[0]


class RowChangedInPlace(RowAndStack):
    def forward(self, x):
        outs = [layer(x[:, i]) for i, layer in enumerate(self.layers)]
        stacked = torch.stack(outs, 1)
        return stacked, outs[0].relu_()


@pytest.mark.parametrize("make", [RowAndStack, RowChangedInPlace])
def test_escaping_row_does_not_alias_the_fused_result(make):
    model = make().eval()
    x = torch.randn(2, 3, 4, 8)
    result = _fuse(model, x, lowering="grouped")
    assert result.changed
    stacked, row = result.model(x)
    want_stacked, want_row = model(x)
    torch.testing.assert_close(stacked, want_stacked)
    torch.testing.assert_close(row, want_row)
    assert stacked.untyped_storage().data_ptr() != row.untyped_storage().data_ptr()
    row.zero_()
    torch.testing.assert_close(stacked, want_stacked)


def test_verification_refuses_new_output_aliasing():
    model = RowAndStack().eval()
    x = torch.randn(2, 3, 4, 8)
    result = _fuse(model, x, lowering="grouped")
    aliasing = copy.deepcopy(result.model)
    for node in list(aliasing.graph.nodes):
        if node.op == "call_method" and node.target in ("clone", "contiguous"):
            node.replace_all_uses_with(node.args[0])
            aliasing.graph.erase_node(node)
    aliasing.recompile()
    with pytest.raises(fxfuse.VerificationError, match="share memory"):
        fxfuse.verify_models(model, aliasing, (x,), check_grads=False)
