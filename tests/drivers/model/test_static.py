"""Static-shape decode (the CUDA-graph path's math), run eagerly on the CPU."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.model.graphs import MIN_BUCKET, StaticDecoder
from tests.drivers.model.conftest import new_state

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2"])
def test_static_steps_match_dynamic_steps(fresh_model, kind):
    """40 greedy tokens: past Mistral's/Qwen2's window of 8, so the static sliding masks are exercised."""
    dynamic, static = fresh_model(kind), fresh_model(kind)
    static.decode_mode = "static"
    a, b = new_state(dynamic, 64), new_state(static, 64)
    assert list(dynamic.generate(a, PROMPT, 40)) == list(static.generate(b, PROMPT, 40))
    assert isinstance(b.static, StaticDecoder) and a.static is None
    ra, rb = dynamic.forward(a, [3]), static.forward(b, [3])
    torch.testing.assert_close(rb.logits, ra.logits, atol=1e-5, rtol=1e-5)
    for mode in ("all", "none", 4):
        ra, rb = dynamic.forward(a, [9], return_logits=mode), static.forward(b, [9], return_logits=mode)
        assert (ra.logits is None) == (rb.logits is None) and (ra.topk_ids is None) == (rb.topk_ids is None)
        if ra.topk_ids is not None:
            assert ra.topk_ids.tolist() == rb.topk_ids.tolist()
    assert a.arena.used_nbytes == b.arena.used_nbytes == a.position * dynamic.bytes_per_token


def test_static_steps_with_steering_and_moves(fresh_model):
    dynamic, static = fresh_model("llama"), fresh_model("llama")
    static.decode_mode = "static"
    a, b = new_state(dynamic), new_state(static)
    for m, s in ((dynamic, a), (static, b)):
        m.forward(s, PROMPT)
        s.set_steering(1, "add", torch.linspace(-1, 1, m.hidden_size))
        s.set_steering(0, "scale", 1.5)
    # Garbage (NaN) rows past the position must not leak into masked-out attention: the tail is zeroed.
    b.arena.move()
    ta = list(dynamic.generate(a, [4], 12))
    tb = list(static.generate(b, [4], 12))
    assert ta == tb
    b.arena.move()
    a.clear_steering(0)
    b.clear_steering(0)
    torch.testing.assert_close(static.forward(b, [6]).logits, dynamic.forward(a, [6]).logits, atol=1e-5, rtol=1e-5)


def test_static_path_is_used_only_for_plain_single_token_steps(fresh_model):
    model = fresh_model("gpt2")
    model.decode_mode = "static"
    state = new_state(model)
    model.forward(state, PROMPT)
    assert state.static is None  # prefill: dynamic
    model.forward(state, [1], pause_at=0)
    model.resume(state)
    model.forward(state, [1], return_activation="last")
    assert state.static is None
    model.forward(state, [1])
    assert state.static is not None


def test_buckets_follow_the_position():
    dec = StaticDecoder.__new__(StaticDecoder)
    dec.max_tokens = 4096
    assert [dec.bucket(p) for p in (0, MIN_BUCKET - 1, MIN_BUCKET, 1000, 4095)] == [
        MIN_BUCKET, MIN_BUCKET, 2 * MIN_BUCKET, 1024, 4096]
    dec.max_tokens = 100
    assert dec.bucket(0) == 100
