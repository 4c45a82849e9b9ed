"""Plans: memory needs measured on the meta device, cached by (op, batch, bucket)."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument
from djinn.drivers.model.plans import PeakTracker, bucket_up
from djinn.drivers.model.runner import Outputs, run_forward
from tests.drivers.model.conftest import new_state


def test_buckets():
    assert [bucket_up(n) for n in (0, 1, 2, 3, 100, 128, 129)] == [0, 1, 2, 4, 128, 128, 256]


def test_plan_is_cached_per_bucket_and_grows_with_the_work(fresh_model):
    model = fresh_model("llama")
    p = model.plan("forward", 100, 0)
    assert (p.op, p.batch, p.n_tokens, p.past) == ("forward", 1, 128, 0)
    assert p.arena_nbytes == 128 * model.bytes_per_token and p.peak_nbytes > 0
    assert model.plan("forward", 128, 0) is p and model.plan("forward", 65, 0) is p
    assert model.stat()["plans"] == {"plans": 1, "hits": 2, "misses": 1}
    assert model.plan("forward", 200, 0).peak_nbytes > p.peak_nbytes
    assert model.plan("forward_all", 100, 0).peak_nbytes >= p.peak_nbytes  # adds [T, vocab] logits
    assert model.plan("decode", 1, 100).peak_nbytes < p.peak_nbytes


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_meta_plan_equals_a_real_run_under_eager_attention(fresh_model, kind):
    """The cold path runs the real driver code on meta tensors, so it counts exactly what a CPU run allocates
    (under inference_mode, as the model runs)."""
    model = fresh_model(kind, "eager")
    for n, past in [(64, 0), (16, 32), (1, 64)]:
        state = new_state(model, 128)
        if past:
            model.forward(state, [5] * past)
        with torch.inference_mode(), PeakTracker() as tracker:
            result = run_forward(model.arch, state, [7] * n, None, Outputs())
            del result
        assert model.plan("forward", n, past).peak_nbytes == tracker.peak_nbytes


def test_sdpa_plans_do_not_count_a_score_matrix(fresh_model):
    eager, sdpa = fresh_model("llama", "eager"), fresh_model("llama", "sdpa")
    assert sdpa.plan("forward", 256, 0).peak_nbytes < eager.plan("forward", 256, 0).peak_nbytes


def test_planning_leaves_the_model_untouched(fresh_model):
    model = fresh_model("gpt2")
    before = model.forward(new_state(model), [1, 2, 3, 4], return_logits="all").logits
    model.plan("forward", 8, 0)
    model.plan("decode", 1, 8)
    after = model.forward(new_state(model), [1, 2, 3, 4], return_logits="all").logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("args", [
    ("backward", 1, 0), ("forward", 0, 0), ("forward", 1, -1), ("decode", 2, 0), ("forward", 200, 100),
    ("forward", True, 0),
])
def test_bad_plan_requests(tiny, args):
    with pytest.raises(BadArgument):
        tiny("gpt2").plan(*args)


def test_a_cold_plan_runs_with_the_collector_paused(tiny, monkeypatch):
    """The meta build and run must not collect garbage (see plans.collector_paused); after, it is as before."""
    import gc

    from djinn.drivers.model import model as model_module

    model = tiny("gpt2")
    seen: list[bool] = []
    real = model_module.measure_on_meta

    def spy(*a, **kw):
        seen.append(gc.isenabled())
        return real(*a, **kw)

    monkeypatch.setattr(model_module, "measure_on_meta", spy)
    gc.enable()
    try:
        model.plan("forward", 70, 130)  # a bucket no other test asks for: a cold plan
        assert seen == [False] and gc.isenabled()
    finally:
        gc.enable()
