"""``fxfuse.fuse`` from several threads at once on different models (issue 19): each
call fuses its own model correctly (torch.fx tracing patches torch process-wide, so the
calls take turns), and the process-wide state is as it was afterwards."""
from __future__ import annotations

import copy
import threading
import warnings

import torch

import fxfuse
from fxfuse import running
from fxfuse.examples import SEED_SHAPE, seed_model
from zoo.heads import HeadsIntoBuffer
from zoo.towers import Tower, TwoKernels


def _models():
    torch.manual_seed(0)
    return [(Tower().eval(), torch.randn(2, 3, 4, 16)),
            (TwoKernels().eval(), torch.randn(2, 3, 6, 16)),
            (HeadsIntoBuffer().eval(), torch.randn(2, 6, 16)),   # the torch.export route
            (seed_model().eval(), torch.randn(2, *SEED_SHAPE[1:]))]


def test_four_threads_fuse_four_models_at_once():
    models, errors, results = _models(), [], {}
    start = threading.Barrier(len(models))

    def work(k: int, model: torch.nn.Module, x: torch.Tensor) -> None:
        start.wait()
        try:
            for _ in range(2):
                result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
                y = torch.randn(3, *x.shape[1:])
                torch.testing.assert_close(result.model(y), model(y), rtol=1e-4, atol=1e-5)
                results.setdefault(k, []).append(sum(s.fused for s in result.sites))
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"model {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(k, m, x)) for k, (m, x) in enumerate(models)]
    ours = [f for f in warnings.filters if f in running._FILTERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, "\n".join(errors)
    assert all(len(results[k]) == 2 and min(results[k]) >= 1 for k in range(4)), results
    assert [f for f in warnings.filters if f in running._FILTERS] == ours   # none left
    try:
        copy.deepcopy(threading.Lock())
    except TypeError:
        pass
    else:
        raise AssertionError("copy.deepcopy still shares locks after fuse returned")
