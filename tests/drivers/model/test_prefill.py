"""Prefill plans: when a plan is captured, kept and dropped (the policy; the CUDA graphs themselves are checked
against the eager path in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.model import prefill
from djinn.drivers.model.cache import ArenaLayout

LAYOUT = ArenaLayout(n_layers=2, n_kv_heads=2, head_dim=4, hidden=8, dtype=torch.float32)


class _Plan:
    """Stands in for PrefillPlan: records its captures (no CUDA here)."""

    made: list[tuple[int, int, int]] = []
    finished: list[tuple[int, int, int]] = []
    fail_with: type[BaseException] | None = None

    def __init__(self, arch, layout, device, n, first, last) -> None:
        self.key = (n, first, last)

    def capture(self) -> None:
        if _Plan.fail_with is not None:
            raise _Plan.fail_with("out of memory")
        _Plan.made.append(self.key)

    def finish(self) -> None:
        _Plan.finished.append(self.key)


@pytest.fixture
def graphs(monkeypatch: pytest.MonkeyPatch) -> prefill.PrefillGraphs:
    monkeypatch.setattr(prefill, "PrefillPlan", _Plan)
    _Plan.made, _Plan.finished, _Plan.fail_with = [], [], None
    return prefill.PrefillGraphs(arch=None, layout=LAYOUT, device=torch.device("cpu"))  # type: ignore[arg-type]


def test_a_shape_is_captured_the_second_time_and_replayed_after(graphs):
    assert graphs.plan(10, 0, 1) is None  # seen once: eager
    plan = graphs.plan(10, 0, 1)
    assert plan is not None and _Plan.made == [(10, 0, 1)]
    assert graphs.plan(10, 0, 1) is plan and _Plan.made == [(10, 0, 1)]  # no second capture
    assert graphs.stat() == {"plans": 1, "captures": 1, "replays": 2}
    assert graphs.plan(10, 1, 1) is None  # another layer span is another key


def test_the_least_recently_used_plan_goes_first(graphs):
    keys = [(n, 0, 1) for n in range(1, prefill.MAX_GRAPHS + 2)]
    for key in keys[:-1]:
        graphs.plan(*key)
        graphs.plan(*key)
    graphs.plan(*keys[0])  # used again: now the newest
    graphs.plan(*keys[-1])
    graphs.plan(*keys[-1])  # one too many: the oldest unused one, keys[1], goes
    assert graphs.stat()["plans"] == prefill.MAX_GRAPHS
    assert _Plan.finished == [keys[1]]  # waited for before it went
    before = len(_Plan.made)
    assert graphs.plan(*keys[0]) is not None and len(_Plan.made) == before  # kept
    assert graphs.plan(*keys[1]) is None  # dropped: seen anew
    graphs.close()
    assert sorted(_Plan.finished) == sorted([keys[1], *[k for k in keys if k != keys[1]]])


def test_a_prefill_past_the_staging_limit_always_runs_eagerly(graphs):
    n = prefill.MAX_STAGING_NBYTES // LAYOUT.kv_bytes_per_token + 1
    for _ in range(3):
        assert graphs.plan(n, 0, 1) is None
    assert _Plan.made == []


def test_a_capture_without_device_memory_leaves_the_step_eager(graphs):
    _Plan.fail_with = torch.cuda.OutOfMemoryError
    graphs.plan(4, 0, 1)
    assert graphs.plan(4, 0, 1) is None and graphs.stat()["plans"] == 0
    _Plan.fail_with = None
    graphs.plan(4, 0, 1)
    assert graphs.plan(4, 0, 1) is not None  # a later second sighting captures


def test_cpu_models_have_no_prefill_plans(tiny):
    model = tiny("gpt2")
    assert model._prefill_plans() is None
    assert model.stat()["prefill_graphs"] == {"plans": 0, "captures": 0, "replays": 0}
