"""generate(): greedy and seeded sampling, stop ids, the unfed last token, cancellation, sample()."""

from __future__ import annotations

import gc

import pytest
import torch

from djinn.drivers.errors import Busy
from djinn.drivers.model import sample
from tests.drivers.model.conftest import new_state

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]


def test_seeded_sampling_is_reproducible(tiny):
    model = tiny("llama")
    run = lambda seed, **kw: list(model.generate(new_state(model), PROMPT, 16, temperature=1.0, seed=seed, **kw))
    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = list(model.generate(new_state(model), PROMPT, 16))
    assert run(7, top_p=1e-6) == greedy  # top-p that keeps one token is greedy
    assert all(0 <= t < model.vocab_size for t in run(9, top_p=0.9))


def test_stop_id_is_yielded_then_generation_ends(tiny):
    model = tiny("gpt2")
    first = list(model.generate(new_state(model), PROMPT, 5))
    assert len(first) == 5
    state = new_state(model)
    assert list(model.generate(state, PROMPT, 5, stop_ids=[first[2]])) == first[: first.index(first[2]) + 1]
    assert not state.generating


def test_last_token_stays_unfed_and_runs_first_next_time(tiny):
    model = tiny("llama")
    state = new_state(model)
    tokens = list(model.generate(state, PROMPT, 4))
    assert state.position == len(PROMPT) + 3 and state.unfed_ids == [tokens[-1]]
    assert state.n_tokens == len(PROMPT) + 4
    r = model.forward(state, [9], return_logits="all")
    assert r.n_tokens == 2 and r.logits.shape[0] == 2 and state.unfed_ids == []
    ref = new_state(model)
    model.forward(ref, PROMPT)
    for t in tokens[:-1]:
        model.forward(ref, [t])
    torch.testing.assert_close(r.logits[-1], model.forward(ref, [tokens[-1], 9]).logits, atol=1e-5, rtol=1e-5)
    # Generating again continues the same sequence as one long generation would.
    more = list(model.generate(state, [11], 3))
    ref2 = new_state(model)
    assert list(model.generate(ref2, PROMPT, 4)) == tokens
    model.forward(ref2, [9])
    assert list(model.generate(ref2, [11], 3)) == more


def test_cancel_leaves_a_usable_state(tiny):
    model = tiny("gpt2")
    state = new_state(model)
    gen = model.generate(state, PROMPT, 10)
    got = [next(gen) for _ in range(3)]
    assert state.generating
    with pytest.raises(Busy):
        model.forward(state, [1])
    gen.close()
    assert not state.generating and state.unfed_ids == [got[-1]]
    assert model.forward(state, [1]).position == len(PROMPT) + 4


def test_a_dropped_or_failed_generator_releases_the_state(tiny):
    model = tiny("gpt2")
    state = new_state(model)
    gen = model.generate(state, PROMPT, 3)
    del gen
    gc.collect()
    assert not state.generating
    gen = model.generate(state, PROMPT, 3)
    next(gen)
    state.generating = False
    model.forward(state, [1])  # changes the state under the open generator
    with pytest.raises(Busy):
        next(gen)
    assert not state.generating


def test_sample_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert sample(logits, 0.0, 1.0, None) == 1  # ties go to the lowest id
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 0.5, gen) for _ in range(50)} <= {1, 3}
    skewed = torch.tensor([10.0, 0.0, 0.0])
    assert {sample(skewed, 1.0, 0.9, gen) for _ in range(20)} == {0}
    assert len({sample(logits, 100.0, 1.0, gen) for _ in range(200)}) == 4
