"""Tests for fxfuse.io.loading: every MODEL form, weights, and every way loading can fail."""
from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from fxfuse.errors import ConfigError
from fxfuse.io.loading import LoadedModel, load_model, parse_dtype, parse_input_shapes

MODELS_SOURCE = textwrap.dedent('''
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv1d(3, width, 3)
            self.bn = nn.BatchNorm1d(width)

        def forward(self, x):
            return self.bn(self.conv(x))

        @classmethod
        def build(cls):
            return cls()

    def build(): return Net()
    def wide(): return Net(width=5)
    def broken(): raise RuntimeError("factory exploded")
    def needs_arg(width): return Net(width)
    def not_a_module(): return [1, 2]
    NOT_CALLABLE = 3
''')

X = torch.randn(2, 3, 8)
# the state_dict file layouts a checkpoint may use: (suffix, wrapper; None = safetensors)
STATE_DICT_FILES = [
    (".pt", lambda sd: sd), (".pt", lambda sd: {"state_dict": sd, "epoch": 3}),
    (".pth", lambda sd: {"model": sd}), (".bin", lambda sd: sd), (".safetensors", None)]

WRITERS = {
    "state_dict": lambda net, path: torch.save(net.state_dict(), path),
    "safetensors": lambda net, path: save_file(net.state_dict(), path),
    "export": lambda net, path: torch.export.save(torch.export.export(net, (X,), strict=False), path),
    "module": torch.save,
}


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A uniquely named importable module of test models; yields (name, file)."""
    name = f"fxf_models_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(MODELS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, path
    sys.modules.pop(name, None)


def _reference(models) -> torch.nn.Module:
    """A fresh Net from the test module, with random BatchNorm statistics."""
    module = __import__(models[0])
    net = module.Net().eval()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    return net


def _save_state_dict(sd: dict, path: Path, wrap: Callable[[dict], object] | None) -> Path:
    if wrap is None:
        save_file(sd, path)
    else:
        torch.save(wrap(sd), path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _raises(match: str, fn: Callable[[], object]) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# ----------------------------------------------------------------- MODEL forms

@pytest.mark.parametrize("spec", ["{mod}:build", "{mod}:Net.build", "{mod}:Net", "{file}:build"])
def test_factory_forms(models, spec):
    name, path = models
    loaded = load_model(spec.format(mod=name, file=path))
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "factory"
    assert type(loaded.model).__name__ == "Net"
    assert not loaded.model.training, "loaded models are put in eval mode"
    assert path.resolve() in loaded.paths
    assert loaded.model(X).shape == (2, 4, 6)


def test_file_factory_imports_siblings(tmp_path):
    (tmp_path / "fxf_sibling_helper.py").write_text("WIDTH = 6\n")
    (tmp_path / "net.py").write_text(
        "import torch\nimport fxf_sibling_helper as h\n"
        "def build():\n    return torch.nn.Conv1d(3, h.WIDTH, 1)\n")
    try:
        model = load_model(f"{tmp_path / 'net.py'}:build").model
    finally:
        sys.modules.pop("fxf_sibling_helper", None)
        sys.modules.pop("net", None)
    assert model.out_channels == 6
    assert str(tmp_path) not in sys.path, "the file's directory is only on sys.path while loading"


def test_export_archive(models, tmp_path):
    net, path = _reference(models), tmp_path / "net.pt2"
    WRITERS["export"](net, path)
    loaded = load_model(str(path))
    assert loaded.kind == "export" and loaded.paths == (path.resolve(),)
    torch.testing.assert_close(loaded.model(X), net(X))


def test_pickled_module_needs_allow_pickle(models, tmp_path):
    net, path = _reference(models), tmp_path / "net.pt"
    torch.save(net, path)
    message = _raises("--allow-pickle", lambda: load_model(str(path)))
    assert "arbitrary code" in message and "trust" in message
    loaded = load_model(str(path), allow_pickle=True)
    assert loaded.kind == "pickle" and loaded.paths == (path.resolve(),)
    torch.testing.assert_close(loaded.model(X), net(X))


def test_pickled_module_whose_code_is_gone(tmp_path, monkeypatch):
    name = f"fxf_gone_{uuid.uuid4().hex[:8]}"
    home = tmp_path / "src"
    home.mkdir()
    (home / f"{name}.py").write_text(MODELS_SOURCE)
    monkeypatch.syspath_prepend(str(home))
    torch.save(__import__(name).Net(), tmp_path / "net.pt")
    sys.modules.pop(name)
    sys.path.remove(str(home))
    _raises("PYTHONPATH", lambda: load_model(str(tmp_path / "net.pt"), allow_pickle=True))


@pytest.mark.parametrize("suffix,wrap", STATE_DICT_FILES)
def test_state_dict_as_model_gets_hint(models, tmp_path, suffix, wrap):
    path = _save_state_dict(_reference(models).state_dict(), tmp_path / f"w{suffix}", wrap)
    message = _raises("is a state_dict", lambda: load_model(str(path)))
    assert "pkg.module:factory" in message and "--weights" in message


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torchscript_archive_is_explained(models, tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(_reference(models)).save(str(path))
    _raises("TorchScript", lambda: load_model(str(path)))


@pytest.mark.parametrize("spec,match", [
    ("model.onnx", "cannot tell what MODEL"),
    ("net.py", "name the factory"),
    ("not a module:build", "not a module name"),
])
def test_unknown_spec(tmp_path, spec, match):
    _raises(match, lambda: load_model(spec))


# ----------------------------------------------------------------- weights

@pytest.mark.parametrize("suffix,wrap", STATE_DICT_FILES)
def test_weights_formats(models, tmp_path, suffix, wrap):
    net = _reference(models)
    path = _save_state_dict(net.state_dict(), tmp_path / f"w{suffix}", wrap)
    loaded = load_model(f"{models[0]}:build", weights=str(path))
    assert path.resolve() in loaded.paths
    torch.testing.assert_close(loaded.model(X), net(X))


def test_weights_mismatch_lists_keys(models, tmp_path):
    sd = dict(__import__(models[0]).wide().state_dict())   # conv/bn of width 5, not 4
    del sd["bn.running_var"]
    sd["head.weight"] = torch.zeros(1)
    path = tmp_path / "wide.pt"
    torch.save(sd, path)
    message = _raises("do not fit Net", lambda: load_model(f"{models[0]}:build", weights=path))
    assert "1 missing (bn.running_var)" in message
    assert "1 unexpected (head.weight)" in message
    assert "conv.weight (5, 3, 3) vs (4, 3, 3)" in message


def test_weights_dataparallel_prefix_is_stripped_or_named(models, tmp_path):
    """A prefix every key shares is stripped when what remains fits exactly (issue 20);
    when it does not, the message names the prefix."""
    sd = {f"module.{k}": v for k, v in _reference(models).state_dict().items()}
    torch.save(sd, tmp_path / "dp.pt")
    loaded = load_model(f"{models[0]}:build", weights=tmp_path / "dp.pt")
    assert set(loaded.model.state_dict()) == {k[len("module."):] for k in sd}
    sd.pop(next(iter(sd)))
    torch.save(sd, tmp_path / "dp_short.pt")
    _raises("starts with 'module.'",
            lambda: load_model(f"{models[0]}:build", weights=tmp_path / "dp_short.pt"))


@pytest.mark.parametrize("content,match", [
    ([1, 2, 3], "not a state_dict"),
    ({"epoch": 3}, "keys: epoch"),
])
def test_weights_without_state_dict(models, tmp_path, content, match):
    torch.save(content, tmp_path / "w.pt")
    _raises(match, lambda: load_model(f"{models[0]}:build", weights=tmp_path / "w.pt"))


def test_weights_holding_objects_need_allow_pickle(models, tmp_path):
    torch.save({"state_dict": _reference(models).state_dict(), "cls": torch.nn.Conv1d},
               tmp_path / "w.pt")
    _raises("--allow-pickle", lambda: load_model(f"{models[0]}:build", weights=tmp_path / "w.pt"))
    loaded = load_model(f"{models[0]}:build", weights=tmp_path / "w.pt", allow_pickle=True)
    assert loaded.kind == "factory"


# ----------------------------------------------------------------- broken files



@pytest.mark.parametrize("kind,name,as_weights,allow", [
    ("state_dict", "w.pt", True, False),
    ("safetensors", "w.safetensors", True, False),
    ("export", "m.pt2", False, False),
    ("module", "m.pt", False, True),
    ("module", "m.pt", False, False),
])
def test_truncated_files(models, tmp_path, kind, name, as_weights, allow):
    path = tmp_path / name
    WRITERS[kind](_reference(models), path)
    _truncate(path)
    call = (lambda: load_model(f"{models[0]}:build", weights=path, allow_pickle=allow)) \
        if as_weights else (lambda: load_model(str(path), allow_pickle=allow))
    message = _raises("truncated or corrupt", call)
    assert str(path) in message


@pytest.mark.parametrize("spec,weights", [
    ("{tmp}/nope.pt2", None), ("{tmp}/nope.pt", None), ("{tmp}/nope.py:build", None),
    ("{mod}:build", "{tmp}/nope.safetensors"), ("{mod}:build", "{tmp}"),
])
def test_missing_files(models, tmp_path, spec, weights):
    fill = {"tmp": tmp_path, "mod": models[0]}
    _raises("does not exist|is not a file|holds none of", lambda: load_model(
        spec.format(**fill), weights=weights.format(**fill) if weights else None))


# ----------------------------------------------------------------- factories that fail

@pytest.mark.parametrize("attr,match", [
    ("broken", "raised RuntimeError: factory exploded"),
    ("needs_arg", "raised TypeError"),
    ("not_a_module", "returned a list, not a torch.nn.Module"),
    ("NOT_CALLABLE", "is a int, not a callable"),
    ("missing", "has no attribute 'missing'"),
    ("Net.nope", "has no attribute 'Net.nope'"),
])
def test_factory_failures(models, attr, match):
    _raises(match, lambda: load_model(f"{models[0]}:{attr}"))


@pytest.mark.parametrize("source,match", [
    ("import fxf_no_such_dependency\n", "importing .* failed .*fxf_no_such_dependency"),
    ("def build(:\n", "failed .*SyntaxError"),
    ("raise ValueError('bad config')\n", "ValueError: bad config"),
])
def test_module_import_failures(tmp_path, monkeypatch, source, match):
    name = f"fxf_bad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    _raises(match, lambda: load_model(f"{name}:build"))
    _raises(match, lambda: load_model(f"{tmp_path / name}.py:build"))
    assert name not in sys.modules


def test_unknown_module():
    _raises("no module named 'fxf_no_such_package'",
            lambda: load_model("fxf_no_such_package.models:build"))


# ----------------------------------------------------------------- dtype, device, inputs

def test_dtype_and_bad_device(models):
    model = load_model(f"{models[0]}:build", dtype="bf16").model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _raises("unknown device", lambda: load_model(f"{models[0]}:build", device="gpu7"))


@pytest.mark.parametrize("name,expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16),
    ("half", torch.float16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("torch.float64", torch.float64), (None, torch.float32), (torch.half, torch.float16)])
def test_parse_dtype(name, expected):
    assert parse_dtype(name) is expected


@pytest.mark.parametrize("name", ["int8", "float8", "", torch.int64])
def test_parse_dtype_rejects(name):
    _raises("dtype", lambda: parse_dtype(name))


@pytest.mark.parametrize("shapes,expected", [
    (["32,15,10,100"], [(32, 15, 10, 100)]),
    (["32x15x10x100"], [(32, 15, 10, 100)]),
    (["2, 3 ,4", "5X6"], [(2, 3, 4), (5, 6)]),
    (["7"], [(7,)]),
])
def test_parse_input_shapes(shapes, expected):
    tensors = parse_input_shapes(shapes, "half", "cpu")
    assert [tuple(t.shape) for t in tensors] == expected
    assert all(t.dtype == torch.float16 for t in tensors)
    again = parse_input_shapes(shapes, "float32", "cpu")
    for a, b in zip(tensors, again):       # same seed: same values whatever the dtype
        torch.testing.assert_close(a, b.half())
    assert tensors[0].std() > 0


@pytest.mark.parametrize("shapes,match", [
    ([], "no --input-shape"), (["2,a"], "bad --input-shape"), (["2,,3"], "bad --input-shape"),
    ([""], "bad --input-shape"), (["0,3"], "at least 1"), (["2,-3"], "at least 1"),
])
def test_parse_input_shapes_rejects(shapes, match):
    _raises(match, lambda: parse_input_shapes(shapes, None, "cpu"))
