"""Real early exit: pause after layer L, resume (with the stored or a replacement activation), steer."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy
from tests.drivers.model.conftest import new_state

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 200, 33]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_pause_at_every_layer_then_resume_is_bitwise_identical(tiny, kind, attn):
    model = tiny(kind, attn)
    ref_state = new_state(model)
    full = model.forward(ref_state, PROMPT, return_logits="all")
    ref_tokens = list(model.generate(ref_state, [8], 8))
    for layer in range(model.n_layers):
        state = new_state(model)
        paused = model.forward(state, PROMPT, pause_at=layer)
        assert paused.logits is None and paused.paused_at == layer and paused.position == 0
        assert (state.paused_at, state.pending) == (layer, len(PROMPT))
        done = model.resume(state, return_logits="all")
        assert torch.equal(done.logits, full.logits), layer
        assert (done.paused_at, done.position, state.paused_at) == (None, len(PROMPT), None)
        assert list(model.generate(state, [8], 8)) == ref_tokens


def test_chained_pauses_are_bitwise_identical(tiny):
    model = tiny("llama")
    full = model.forward(new_state(model), PROMPT, return_logits="all")
    state = new_state(model)
    model.forward(state, PROMPT, pause_at=0)
    assert model.resume(state, pause_at=1).paused_at == 1
    assert model.resume(state, pause_at=2).paused_at == 2
    assert torch.equal(model.resume(state, return_logits="all").logits, full.logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_scaled_activation_changes_logits_and_identical_replacement_does_not(tiny, kind):
    model = tiny(kind)
    full = model.forward(new_state(model), PROMPT, return_logits="all")
    state = new_state(model)
    act = model.forward(state, PROMPT, pause_at=1, return_activation="all").activation
    same = model.resume(state, act.clone(), return_logits="all")
    assert torch.equal(same.logits, full.logits)
    state = new_state(model)
    model.forward(state, PROMPT, pause_at=1)
    steered = model.resume(state, act * 0.9, return_logits="all")
    assert not torch.allclose(steered.logits, full.logits, atol=1e-4)
    # An edit becomes the sequence's history: the next token sees the edited KV of layers 2.. (a random
    # edit: the pre-attention norms make K and V blind to a rescale, and LayerNorm to an offset too).
    state = new_state(model)
    model.forward(state, PROMPT, pause_at=1)
    model.resume(state, act + torch.randn(act.shape, generator=torch.Generator().manual_seed(0)))
    unsteered_next = model.forward(new_state(model), PROMPT + [8]).logits
    assert not torch.allclose(model.forward(state, [8]).logits, unsteered_next, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_pause_runs_no_layer_after_it_and_resume_runs_each_once(tiny, kind, monkeypatch):
    """An early exit, not a full forward whose result is hidden: layers after L run only at resume."""
    model = tiny(kind)
    ran: list[int] = []
    run_layer = model.arch.run_layer

    def counted(i, *args, **kwargs):
        ran.append(i)
        return run_layer(i, *args, **kwargs)

    monkeypatch.setattr(model.arch, "run_layer", counted)
    for layer in range(model.n_layers):
        state = new_state(model)
        ran.clear()
        model.forward(state, PROMPT, pause_at=layer)
        assert ran == list(range(layer + 1)), layer
        ran.clear()
        model.resume(state)
        assert ran == list(range(layer + 1, model.n_layers)), layer


def test_pause_at_last_layer_runs_only_the_head(tiny):
    model = tiny("gpt2")
    full = model.forward(new_state(model), PROMPT)
    state = new_state(model)
    model.forward(state, PROMPT, pause_at=model.n_layers - 1)
    assert torch.equal(model.resume(state).logits, full.logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pause_and_resume_every_decode_step(tiny, kind):
    model = tiny(kind)
    plain, stepped = new_state(model), new_state(model)
    expected = model.forward(plain, PROMPT).logits
    model.forward(stepped, PROMPT, pause_at=0)
    got = model.resume(stepped).logits
    for step in range(10):
        assert torch.equal(got, expected), step
        token = int(torch.argmax(got))
        expected = model.forward(plain, [token]).logits
        r = model.forward(stepped, [token], pause_at=step % model.n_layers, return_activation="last")
        assert r.activation.shape == (model.hidden_size,) and stepped.pending == 1
        got = model.resume(stepped).logits
    assert stepped.position == plain.position == len(PROMPT) + 10


def test_paused_state_refuses_other_calls_and_stays_resumable(tiny):
    model = tiny("llama")
    full = model.forward(new_state(model), PROMPT)
    state = new_state(model)
    model.forward(state, PROMPT, pause_at=1)
    with pytest.raises(Busy):
        model.forward(state, [1])
    with pytest.raises(Busy):
        model.generate(state, [1], 3)
    bad = [
        dict(activation=torch.zeros(len(PROMPT) + 1, model.hidden_size)),
        dict(activation=torch.zeros(len(PROMPT), model.hidden_size, dtype=torch.float64)),
        dict(activation=[[0.0] * model.hidden_size] * len(PROMPT)),
        dict(pause_at=1),
        dict(pause_at=0),
        dict(pause_at=model.n_layers),
        dict(return_logits="most"),
        dict(return_activation="some"),
    ]
    for kw in bad:
        with pytest.raises(BadArgument):
            model.resume(state, **kw)
        assert (state.paused_at, state.pending, state.position) == (1, len(PROMPT), 0)
    assert torch.equal(model.resume(state).logits, full.logits)
    with pytest.raises(Busy):
        model.resume(state)


def test_discard_pending_forgets_the_paused_tokens(tiny):
    model = tiny("gpt2")
    state = new_state(model)
    model.forward(state, PROMPT[:4])
    model.forward(state, PROMPT[4:], pause_at=0)
    state.discard_pending()
    assert (state.position, state.paused_at, state.pending) == (4, None, 0)
    got = model.forward(state, [9]).logits
    ref = new_state(model)
    model.forward(ref, PROMPT[:4])
    assert torch.equal(got, model.forward(ref, [9]).logits)


def test_replacement_activation_accepts_batch_and_vector_forms(tiny):
    model = tiny("gpt2")
    state = new_state(model)
    act = model.forward(state, [3], pause_at=1, return_activation="all").activation
    assert act.shape == (1, model.hidden_size)
    a = model.resume(state, act[0]).logits  # [hidden] for one pending token
    state = new_state(model)
    model.forward(state, [3], pause_at=1)
    b = model.resume(state, act.unsqueeze(0)).logits  # [1, T, hidden]
    assert torch.equal(a, b)


class TestSteering:
    def test_steering_applies_every_step_until_cleared(self, tiny):
        model = tiny("llama")
        plain = list(model.generate(new_state(model), PROMPT, 8))
        state = new_state(model)
        state.set_steering(1, "scale", 0.5)
        steered = list(model.generate(state, PROMPT, 8))
        assert steered != plain
        state2 = new_state(model)
        state2.set_steering(1, "add", torch.zeros(model.hidden_size))
        assert list(model.generate(state2, PROMPT, 8)) == plain
        state2.set_steering(1, "scale", 0.5)
        state2.clear_steering(1)
        state2.clear_steering()
        assert state2.steering == {}

    def test_steering_equals_editing_the_paused_activation(self, tiny):
        model = tiny("gpt2")
        state = new_state(model)
        act = model.forward(state, PROMPT, pause_at=1, return_activation="all").activation
        edited = model.resume(state, act * 0.9, return_logits="all").logits
        steered_state = new_state(model)
        steered_state.set_steering(1, "scale", 0.9)
        steered = model.forward(steered_state, PROMPT, return_logits="all").logits
        torch.testing.assert_close(steered, edited, atol=1e-6, rtol=1e-6)

    def test_paused_activation_includes_the_layers_steering(self, tiny):
        model = tiny("gpt2")
        plain = model.forward(new_state(model), PROMPT, pause_at=1, return_activation="all").activation
        state = new_state(model)
        state.set_steering(1, "add", 1.0)
        got = model.forward(state, PROMPT, pause_at=1, return_activation="all").activation
        torch.testing.assert_close(got, plain + 1.0)

    @pytest.mark.parametrize("args", [
        (-1, "add", 1.0), (3, "add", 1.0), (True, "add", 1.0), (0, "mul", 1.0), (0, "add", [1.0, 2.0]),
        (0, "add", float("nan")), (0, "add", "x"),
    ])
    def test_bad_steering_is_refused(self, tiny, args):
        state = new_state(tiny("gpt2"))
        with pytest.raises(BadArgument):
            state.set_steering(*args)
        assert state.steering == {}
