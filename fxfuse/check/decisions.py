"""Decisions you can keep: ``auto``'s measured choices, recorded and reused.

Like a cuDNN benchmark cache or a TVM tuning log: a decision is keyed by what decides the
cost of a site — its structure (the per-row steps, rows, layout plans, conv settings),
the traced shapes, strides and dtypes of what it reads and makes, the device, the number
of threads and the torch version — never by node names or weights. The same model on the
same kind of machine then gets the same model back, without timing again.

The recorded form is plain JSON (:meth:`Decisions.to_dict`)::

    {"format": "fxfuse-decisions", "version": 1,
     "entries": {"<sha256 of the key>": {"lowering": "grouped", "where": "layers.0..layers.9",
                                         "key": {...}, "choice": {...}}}}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Callable, Mapping

import torch
from torch import fx

from ..errors import ConfigError
from ..match.sites import RowSite
from ..progress import stage
from .decide import LOOP, Choice, reused

log = logging.getLogger("fxfuse")

FORMAT = "fxfuse-decisions"
VERSION = 1


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data (dataclasses, tuples, dtypes, devices, sizes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple, torch.Size)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _tensor_facts(node: fx.Node) -> Any:
    """Shape, stride and dtype a node was traced with (``None`` when not recorded)."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return {"shape": list(meta.shape), "stride": _plain(getattr(meta, "stride", None)),
            "dtype": str(meta.dtype)}


def _device(gm: fx.GraphModule) -> str:
    for t in [*gm.parameters(), *gm.buffers()]:
        return str(t.device)
    return "cpu"


def site_key(gm: fx.GraphModule, site: RowSite) -> dict[str, Any]:
    """What decides ``site``'s cost, as JSON-ready data (node names left out)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ends = [site.source, *(site.convs if site.loop_kind == "siblings" else (site.combine,))]
    return {
        "structure": {"loop_kind": site.loop_kind, "combine_kind": site.combine_kind,
                      "rows": site.rows, "steps": list(site.steps),
                      "groups": _plain(site.groups), "family": site.family,
                      "reduce": site.reduce, "shared_module": site.shared_module,
                      "spec": _plain(site.spec), "input_plan": _plain(site.input_plan),
                      "output_plan": _plain(site.output_plan),
                      "row_exports": len(site.row_exports)},
        "tensors": [_tensor_facts(nodes[n]) if n in nodes else None for n in ends],
        "device": _device(gm),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """A short stable name for ``key``: the sha256 of its canonical JSON."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Decisions:
    """Recorded ``auto`` decisions: read from a previous run, added to by this one."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, source: str = "decisions"):
        self.entries: dict[str, dict[str, Any]] = {}
        self.source = source
        if data is not None:
            self.entries = _checked(data, source)

    def lookup(self, key: Mapping[str, Any], allowed: tuple[str, ...]) -> Choice | None:
        """The recorded choice for ``key``, when it names a lowering still ``allowed``."""
        entry = self.entries.get(key_digest(key))
        if entry is None:
            return None
        choice = Choice.from_dict(entry["choice"])
        if choice.lowering != LOOP and choice.lowering not in allowed:
            log.info("recorded decision %s names %r, not a candidate now; timing again",
                     key_digest(key), choice.lowering)
            return None
        return reused(choice)

    def record(self, key: Mapping[str, Any], choice: Choice, where: str) -> None:
        """Keep ``choice`` for ``key`` (only measured choices are worth keeping)."""
        if not choice.timed:
            return
        saved = dataclasses.replace(choice, note="", reused=False)
        self.entries[key_digest(key)] = {"lowering": choice.lowering, "where": where,
                                         "key": dict(key), "choice": saved.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :class:`Decisions` reads it back."""
        return {"format": FORMAT, "version": VERSION,
                "entries": json.loads(json.dumps(self.entries))}

    @classmethod
    def from_json(cls, text: str, source: str = "decisions") -> "Decisions":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source} is not JSON ({exc}); give a file written by "
                              "fxfuse --decisions, or remove it to record a new one") from exc
        return cls(data, source=source)


def _checked(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """The entries of recorded decisions, after checking their form."""
    fix = "give a file written by fxfuse --decisions, or remove it to record a new one"
    if isinstance(data, Decisions):
        return dict(data.entries)
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ConfigError(f"{source} is not a fxfuse decisions record (no "
                          f"\"format\": \"{FORMAT}\"); {fix}")
    if data.get("version") != VERSION:
        raise ConfigError(f"{source} has version {data.get('version')!r}, this fxfuse reads "
                          f"version {VERSION}; {fix}")
    entries = data.get("entries")
    if not isinstance(entries, Mapping):
        raise ConfigError(f"{source} has no \"entries\" mapping; {fix}")
    for name, entry in entries.items():
        try:
            Choice.from_dict(entry["choice"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: entry {name} is malformed ({exc!r}); {fix}") from exc
    return {str(k): dict(v) for k, v in entries.items()}


def choose_recorded(gm: fx.GraphModule, site: RowSite, choose: Callable[[], Choice],
                    allowed: tuple[str, ...], cache: Decisions | None) -> Choice:
    """The recorded decision for ``site`` when ``cache`` holds one, else ``choose()``
    (recorded into ``cache``)."""
    timing = f"timing {site.name}: {site.rows} rows at {site.where()}"
    if cache is None:
        stage(timing)
        return choose()
    key = site_key(gm, site)
    found = cache.lookup(key, allowed)
    if found is not None:
        log.info("%s: %s (recorded decision %s)", site.name, found.lowering, key_digest(key))
        return found
    stage(timing)
    choice = choose()
    cache.record(key, choice, site.where())
    return choice
