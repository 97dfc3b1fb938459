"""The public API: ``fuse`` and its options, errors, verification, weight map, report."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxfuse
import fxfuse.passes.kinds
from zoo import base, spellings, refused, whole
from conftest import check, fresh_inputs


def _fuse(model, *inputs, **options):
    options.setdefault("lowering", "grouped")
    options.setdefault("benchmark", False)
    return fxfuse.fuse(model, inputs, **options)


class WithBatchNorm(spellings.Seed):
    """The seed loop, then a BatchNorm2d left in train mode (its forward updates buffers)."""

    def __init__(self) -> None:
        super().__init__(padding=1)
        self.bn = nn.BatchNorm2d(self.C_out)

    def forward(self, x):
        return self.bn(super().forward(x))


# ------------------------------------------------------------------ the input model

@pytest.mark.parametrize("timed", [False, True], ids=["verify", "verify+benchmark"])
@pytest.mark.parametrize("make", [spellings.Seed, WithBatchNorm, spellings.BufferWrite],
                         ids=["seed", "batchnorm-train-mode", "export-traced"])
def test_input_model_untouched(make, timed):
    model = make()
    x = model.example()
    state = copy.deepcopy(model.state_dict())
    ref = copy.deepcopy(model)(x)
    result = _fuse(model, x, benchmark=timed, bench_rounds=2)
    assert result.changed
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key
    assert model.training
    torch.testing.assert_close(copy.deepcopy(model)(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("make", [spellings.Seed, WithBatchNorm], ids=["seed", "batchnorm-train-mode"])
def test_fused_model_state_maps_back_exactly(make):
    """Verification and timing must not move the fused model's buffers either."""
    model = make()
    result = _fuse(model, model.example(), benchmark=True, bench_rounds=2)
    back = result.weight_map.to_original(result.model.state_dict())
    original = model.state_dict()
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_inplace_reuses_the_model():
    model = spellings.Seed()
    x = model.example()
    ref = model(x)
    result = _fuse(model, x, inplace=True)
    assert result.changed
    torch.testing.assert_close(result.model(x), ref)


def test_fused_parameters_are_new_tensors():
    model = spellings.Seed()
    result = _fuse(model, model.example())
    with torch.no_grad():
        result.model.layers_fused.weight.zero_()
    assert all(bool(conv.weight.abs().sum() > 0) for conv in model.layers)


# ------------------------------------------------------------------ options and errors

@pytest.mark.parametrize("options,match", [
    ({"no_such_option": 1}, "unknown option 'no_such_option'"),
    ({"lowering": "fastest"}, "lowering='fastest'"),
    ({"lowering": "loop"}, "lowering='loop'"),
    ({"tracer": "jit"}, "tracer='jit'"),
    ({"min_rows": 0}, "min_rows"),
    ({"min_rows": True}, "min_rows"),
    ({"bench_rounds": 0}, "bench_rounds"),
    ({"rtol": -1.0}, "rtol"),
    ({"auto_rounds": 0}, "auto_rounds"),
    ({"verify": "yes"}, "verify"),
    ({"config": {"lowering": "grouped"}}, "FuseConfig"),
], ids=["unknown-option", "bad-lowering", "loop-lowering", "bad-tracer", "min-rows-0",
        "min-rows-bool", "bench-rounds-0", "negative-rtol", "auto-rounds-0", "verify-str",
        "config-dict"])
def test_config_errors(options, match):
    model = spellings.Seed()
    with pytest.raises(fxfuse.ConfigError, match=match) as info:
        fxfuse.fuse(model, (model.example(),), benchmark=False, **options)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, fxfuse.FxFuseError)


def test_not_a_module():
    with pytest.raises(fxfuse.ConfigError, match="torch.nn.Module"):
        fxfuse.fuse(lambda x: x, (torch.randn(2, 3),), benchmark=False)


def test_config_object_and_override():
    model = spellings.Seed()
    config = fxfuse.FuseConfig(lowering="grouped2d", benchmark=False, min_rows=10)
    result = fxfuse.fuse(model, (model.example(),), config=config, lowering="grouped2d",
                         benchmark=False, min_rows=2)
    assert result.sites[0].lowering == "grouped2d"


def test_config_fields_hold_when_keywords_are_not_given():
    model = spellings.Seed()
    config = fxfuse.FuseConfig(lowering="grouped2d", verify=False, benchmark=False)
    result = fxfuse.fuse(model, (model.example(),), config=config)
    assert result.sites[0].lowering == "grouped2d"
    assert result.verification is None and result.timing is None
    result = fxfuse.fuse(model, (model.example(),), config=config, lowering="grouped")
    assert result.sites[0].lowering == "grouped" and result.verification is None
    left = fxfuse.fuse(model, (model.example(),), config=fxfuse.FuseConfig(
        min_rows=10, benchmark=False))
    assert not left.changed and "min_rows" in left.sites[0].reason


def test_explicit_default_value_overrides_config():
    model = spellings.Seed()
    config = fxfuse.FuseConfig(lowering="grouped2d", verify=False, benchmark=False)
    result = fxfuse.fuse(model, (model.example(),), config=config, verify=True)
    assert result.verification is not None


def test_bad_lowering_for_apply_sites_is_a_config_error():
    model = spellings.Seed()
    gm = fxfuse.trace_model(model, (model.example(),))
    with pytest.raises(fxfuse.ConfigError, match="lowering='fast'"):
        fxfuse.apply_sites(gm, fxfuse.find_row_sites(gm), "fast")


def test_one_tensor_as_inputs():
    model = spellings.Seed()
    result = fxfuse.fuse(model, model.example(), lowering="grouped", benchmark=False)
    assert result.changed


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = base.make_convs(3, 3, 3, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return torch.stack([self.layers[h](x[:, :, h]) for h in range(3)], 2)


@pytest.mark.parametrize("tracer", ["auto", "symbolic", "export"])
def test_untraceable_model(tracer):
    with pytest.raises(fxfuse.TraceError) as info:
        fxfuse.fuse(DataDependent(), (torch.randn(2, 3, 3, 8),), tracer=tracer,
                    benchmark=False)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "DataDependent" in message
    if tracer != "export":
        assert "control flow" in message


def test_wrong_inputs_trace_error():
    model = spellings.Seed()
    with pytest.raises(fxfuse.TraceError, match="example inputs") as info:
        fxfuse.fuse(model, (torch.randn(2, 7, 4, 8),), tracer="symbolic", benchmark=False)
    assert "\n" not in str(info.value)


def test_concrete_args_make_it_traceable():
    class Flag(spellings.Seed):
        def forward(self, x, flip):
            return super().forward(-x if flip else x)

    model = Flag()
    result = fxfuse.fuse(model, (model.example(), True), concrete_args={"flip": True},
                         tracer="symbolic", lowering="grouped", benchmark=False)
    assert result.changed and result.tracer == "symbolic"


# ------------------------------------------------------------------ verification

def _break(result: fxfuse.FuseResult) -> nn.Module:
    """The fused model with one weight changed (what a wrong rewrite would give)."""
    broken = copy.deepcopy(result.model)
    fused = next(m for n, m in broken.named_modules() if n.endswith("_fused"))
    with torch.no_grad():
        fused.weight[0, 0, 0] += 1.0
    return broken


def test_verification_error_on_broken_numbers():
    model = spellings.Seed()
    x = model.example()
    result = _fuse(model, x)
    with pytest.raises(fxfuse.VerificationError) as info:
        fxfuse.verify_models(model, _break(result), (x,), weight_map=result.weight_map)
    err = info.value
    assert err.max_abs > 0.1 and err.max_rel > 0 and err.check == "example inputs"
    assert "refused" in str(err) and "\n" not in str(err)


def test_verification_error_raised_by_fuse(monkeypatch):
    """``fuse`` refuses a rewrite whose numbers are off: nothing is returned."""
    original = fxfuse.passes.kinds.rewrite_site

    def wrong_rewrite(gm, site, lowering="grouped", **kw):
        wmap = original(gm, site, lowering, **kw)
        with torch.no_grad():
            gm.get_submodule(wmap.entries[0].fused_key.rpartition(".")[0]).weight.mul_(1.01)
        return wmap

    monkeypatch.setattr(fxfuse.passes.kinds, "rewrite_site", wrong_rewrite)
    model = spellings.Seed()
    with pytest.raises(fxfuse.VerificationError) as info:
        _fuse(model, model.example())
    assert info.value.max_abs > 0


def test_verification_report():
    model = spellings.Seed()
    result = _fuse(model, model.example())
    report = result.verification
    assert report.max_abs < 1e-4 and report.max_rel < 1e-4
    names = [c.name for c in report.checks]
    assert names[0] == "example inputs" and any(n.startswith("batch ") for n in names)
    assert any("grad" in n for n in names)
    assert _fuse(model, model.example(), verify=False).verification is None


def test_verify_models_on_identical_models():
    model = spellings.Seed()
    report = fxfuse.verify_models(model, copy.deepcopy(model), (model.example(),))
    assert report.max_abs == 0


# ------------------------------------------------------------------ weight map

@pytest.mark.parametrize("lowering", ["grouped", "grouped2d"])
@pytest.mark.parametrize("make", [spellings.Seed, spellings.Functional, whole.TwoSites, spellings.BufferWrite],
                         ids=["seed", "functional", "two-sites", "export-traced"])
def test_weight_map_round_trip(make, lowering, tmp_path):
    model = make()
    result = _fuse(model, torch.randn(2, *model.in_shape), lowering=lowering)
    wmap = result.weight_map
    original = model.state_dict()
    fused = wmap.to_fused(original)
    assert sorted(fused) == sorted(result.model.state_dict())
    for key, value in result.model.state_dict().items():
        assert torch.equal(fused[key], value), key
    back = wmap.to_original(fused)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    wmap.save(tmp_path / "map.json")
    loaded = fxfuse.WeightMap.load(tmp_path / "map.json")
    assert loaded == wmap
    assert fxfuse.WeightMap.from_json(wmap.to_json()) == wmap


def test_weight_map_loads_trained_weights():
    """Weights trained in the original layout load into the fused model and match."""
    model = spellings.Seed()
    x = model.example()
    result = _fuse(model, x)
    trained = spellings.Seed()
    result.model.load_state_dict(result.weight_map.to_fused(trained.state_dict()))
    other = fresh_inputs((x,), 5)[0]
    torch.testing.assert_close(result.model(other), trained(other))


@pytest.mark.parametrize("text,match", [
    ("not json", "not an fxfuse weight map"),
    ('{"format": "other/1", "entries": []}', "format"),
    ('{"format": "fxfuse-weight-map/1"}', "entries"),
])
def test_weight_map_bad_json(text, match):
    with pytest.raises(fxfuse.ConfigError, match=match):
        fxfuse.WeightMap.from_json(text)


def test_weight_map_missing_file(tmp_path):
    with pytest.raises(fxfuse.ConfigError, match="cannot read weight map"):
        fxfuse.WeightMap.load(tmp_path / "missing.json")


def test_weight_map_wrong_state_dict():
    model = spellings.Seed()
    result = _fuse(model, model.example())
    with pytest.raises(fxfuse.ConfigError, match="layers.0.weight"):
        result.weight_map.to_fused({})
    with pytest.raises(fxfuse.ConfigError, match="lacks layers_fused"):
        result.weight_map.to_original(model.state_dict())


# ------------------------------------------------------------------ report and dict

def test_report_with_benchmark():
    model = spellings.Seed()
    result = _fuse(model, model.example(), benchmark=True, bench_rounds=2)
    text = result.report()
    assert "site0" in text and "layers.0..layers.3" in text and "speedup" in text
    assert result.timing is not None and result.timing.original.rounds == 2
    json.loads(json.dumps(result.to_dict()))


@pytest.mark.parametrize("make,lowering", [
    (spellings.Seed, "grouped"), (refused.KernelSizes, "grouped"), (whole.Shared, "grouped"),
    (spellings.Seed, "auto"), (spellings.BufferWrite, "grouped2d"),
], ids=["fused", "left-alone", "batched", "auto", "export-grouped2d"])
def test_to_dict_is_json(make, lowering):
    model = make()
    result = _fuse(model, model.example(), lowering=lowering)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tracer"] == result.tracer
    assert len(data["sites"]) == 1
    site = data["sites"][0]
    assert site["rows"] == model.H and site["fused"] == result.sites[0].fused
    if result.sites[0].spec is not None:
        assert site["conv"]["dtype"] == "torch.float32"


def test_report_without_sites():
    result = _fuse(nn.Sequential(nn.Conv1d(3, 3, 3)), torch.randn(2, 3, 8))
    assert result.sites == () and not result.changed
    assert "no per-row Conv1d loop found" in result.report()
    assert result.verification is None


def test_code_before_and_after():
    model = spellings.Seed()
    result = _fuse(model, model.example())
    assert "layers_3" in result.code_before and "layers_fused" in result.code_after


# ------------------------------------------------------------------ the steps, one by one

def test_steps_compose():
    model = spellings.Seed()
    x = model.example()
    gm = fxfuse.trace_model(copy.deepcopy(model), (x,))
    sites = fxfuse.find_row_sites(gm)
    assert [s.fusable for s in sites] == [True]
    code = gm.code
    assert gm.code == code                        # finding changes nothing
    done, wmap = fxfuse.apply_sites(gm, sites, "grouped")
    assert done[0].fused and wmap.entries
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(fxfuse.RewriteError, match="does not match this graph"):
        fxfuse.rewrite_site(gm, sites[0])


def test_rewrite_refuses_unfusable_site():
    model = refused.KernelSizes()
    gm = fxfuse.trace_model(copy.deepcopy(model), (model.example(),))
    site = fxfuse.find_row_sites(gm)[0]
    with pytest.raises(fxfuse.RewriteError, match="cannot be rewritten"):
        fxfuse.rewrite_site(gm, site)
    with pytest.raises(fxfuse.RewriteError, match="unknown lowering"):
        fxfuse.rewrite_site(gm, site, "loop")


def test_fused_model_trains():
    model = spellings.Seed(padding=1)
    result = check(model, (model.example(),), 1)
    fused = result.model.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    x, target = model.example(4), torch.randn(4, model.C_out, model.H, model.W)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (fused(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
