"""``.pt2`` archives written by the torch versions fxfuse supports, read by this one.

``tests/data/linear_torch-*.pt2`` were written by torch 2.4.1, 2.5.1 and 2.6.0 (the flat
layout of ``torch.export.save`` up to torch 2.7) and torch 2.13.0 (the pt2-archive layout,
one root folder); ``tests/data/write_archive.py`` writes them. torch reads only archives of
its own export schema's major version (5 in 2.4, 7 in 2.5, 8 from 2.6 on). Each is inspected the same
way under every torch; each loads and runs where this torch can read it, and otherwise
fails in one line that names the torch that wrote it and the one reading it.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from fxfuse.errors import ConfigError
from fxfuse.io.archive import inspect_archive, reader_schema
from fxfuse.io.loading import load_model
from trust_support import torch_payload

DATA = Path(__file__).parent / "data"
# file → (layout, torch version recorded in it, export schema)
ARCHIVES = {"linear_torch-2.4.1.pt2": ("flat", None, "5.3"),
            "linear_torch-2.5.1.pt2": ("flat", "2.5.1+cu124", "7.3"),
            "linear_torch-2.6.0.pt2": ("flat", "2.6.0+cu124", "8.2"),
            "linear_torch-2.13.0.pt2": ("pt2", "2.13.0+cpu", "8.20")}


def _expected(path: Path) -> torch.Tensor:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("expected.json"))
        return torch.tensor(json.loads(z.read(name)))


def _rewrite_flat(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.pop(info.filename, zin.read(info.filename)))
        for name, data in replace.items():
            zout.writestr(name, data)
    return dst


@pytest.mark.parametrize("name", ARCHIVES)
def test_every_layout_is_inspected_alike(name):
    report = inspect_archive(DATA / name)
    assert (report.layout, report.writer, report.schema) == ARCHIVES[name]
    assert report.runs == []


@pytest.mark.parametrize("name", ARCHIVES)
def test_archive_loads_or_names_both_torch_versions(name):
    path = DATA / name
    report = inspect_archive(path)
    if report.unreadable_here() is None:
        model = load_model(str(path)).model
        with torch.no_grad():
            torch.testing.assert_close(model(torch.arange(18.0).reshape(6, 3) / 10),
                                       _expected(path))
        return
    with pytest.raises(ConfigError) as info:
        load_model(str(path))
    message = str(info.value)
    written = ARCHIVES[name][1] or "does not record its version"
    assert "\n" not in message and written in message, message
    assert f"read by torch {torch.__version__}" in message, message
    assert f"export schema {reader_schema()}" in message and "re-export" in message, message


def test_flat_archive_with_pickled_weights_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = _rewrite_flat(DATA / "linear_torch-2.6.0.pt2", tmp_path / "evil.pt2",
                         {"serialized_state_dict.pt": torch_payload(marker)})
    with pytest.raises(ConfigError, match="--allow-pickle") as info:
        load_model(str(evil))
    assert "serialized_state_dict.pt" in str(info.value) and "weights" in str(info.value)
    assert not marker.exists()


def test_flat_archive_with_a_stray_entry_is_refused(tmp_path):
    stray = _rewrite_flat(DATA / "linear_torch-2.4.1.pt2", tmp_path / "stray.pt2",
                          {"data/aotinductor/model.so": b"\x7fELF"})
    with pytest.raises(ConfigError, match="AOTInductor"):
        load_model(str(stray))


def test_a_zip_that_is_no_archive_names_the_reading_torch(tmp_path):
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", b"hello")
    with pytest.raises(ConfigError, match="not a torch.export archive") as info:
        load_model(str(path))
    assert torch.__version__ in str(info.value)
