"""decode_batch: several sessions' decode steps in one pass, each as if it had run alone.

The arenas come from one real VMU Data segment (batching addresses them inside its one storage), filled
with NaN bytes first, so a step that read a row no one wrote would show it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy
from djinn.drivers.model import LoadedModel
from djinn.drivers.model.batch import BatchDecoder, _word
from djinn.drivers.model.cache import ArenaLayout
from djinn.drivers.vmu import VMU
from tests.drivers.model.conftest import new_state
from tests.fakes import TINY_KINDS

PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 200, 201], list(range(30, 70)), [250], [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture
def vmu() -> Any:
    v = VMU("cpu", text_nbytes=0, data_nbytes=16 << 20, stack_nbytes=0, host_nbytes=1 << 20)
    v.data.tensor.fill_(0xFF)  # NaN in every float dtype: unwritten rows must never be read
    yield v
    v.close()


def states_in(vmu: Any, model: LoadedModel, n: int, max_tokens: int = 96) -> list[Any]:
    return [model.new_state(vmu.alloc_arena(f"s{i}", model.arena_nbytes(max_tokens)), max_tokens) for i in range(n)]


def alone(model: LoadedModel, prompt: list[int], n: int) -> list[int]:
    return list(model.generate(new_state(model), prompt, n))


def in_batches(model: LoadedModel, states: list[Any], prompts: list[list[int]], n: int) -> list[list[int]]:
    """Prefill each alone (first next()), then every later id from decode_batch over all still going."""
    gens = [model.generate(s, p, n) for s, p in zip(states, prompts)]
    out = [[next(g)] for g in gens]
    while live := [i for i, g in enumerate(gens) if g.batchable]:
        for i, tok in zip(live, model.decode_batch([gens[i] for i in live])):
            out[i].append(tok)
    for g in gens:
        assert next(g, None) is None and not g.state.generating
    return out


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_batched_ids_match_each_session_alone(tiny, vmu, kind):
    model = tiny(kind)
    prompts = PROMPTS[:3]  # a batch of 3: padded to 4 with a repeat of the first row
    states = states_in(vmu, model, len(prompts))
    got = in_batches(model, states, prompts, 12)
    assert got == [alone(model, p, 12) for p in prompts]
    for s, p in zip(states, prompts):
        assert s.position == len(p) + 11 and s.unfed_ids == [got[prompts.index(p)][-1]]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_batched_logits_and_cache_rows_match_single_steps(tiny, vmu, kind):
    model = tiny(kind)
    states, refs = states_in(vmu, model, 5), [new_state(model, 96) for _ in range(5)]
    for s, r, p in zip(states, refs, PROMPTS):
        model.forward(s, p)
        model.forward(r, p)
    batcher = BatchDecoder(model.arch, model.layout, model.device, use_graphs=False)
    tokens = [11, 12, 13, 14, 15]
    with torch.inference_mode():
        logits = batcher.step(states, tokens)
    assert logits.shape == (5, model.vocab_size)
    for row, r, s, t in zip(logits, refs, states, tokens):
        torch.testing.assert_close(row, model.forward(r, [t]).logits, atol=1e-5, rtol=1e-5)
        assert s.position == r.position and s.unfed_ids == []
        n = s.position
        torch.testing.assert_close(s.views().kv[:n], r.views().kv[:n], atol=1e-5, rtol=1e-5)
    assert batcher.stat() == {"steps": 1, "sequences": 5, "graphs": 0, "captures": 0, "replays": 0}


def test_addresses_says_whether_a_state_lives_in_the_storage_the_graphs_address(tiny, vmu):
    """A lone step goes through the shared batch decoder only for a state whose arena is in its storage."""
    model = tiny("llama")
    inside, other = states_in(vmu, model, 2), new_state(model, 96)  # `other`: an arena tensor of its own
    batcher = BatchDecoder(model.arch, model.layout, model.device, use_graphs=False)
    assert batcher.addresses(other) and batcher.addresses(inside[0])  # nothing bound yet
    for s in inside:
        model.forward(s, PROMPTS[0])
    with torch.inference_mode():
        batcher.step(inside, [1, 2])
    assert batcher.addresses(inside[0]) and batcher.addresses(inside[1]) and not batcher.addresses(other)


def test_sampling_and_stop_ids_per_session(tiny, vmu):
    model = tiny("gpt2")
    states = states_in(vmu, model, 2)
    ref = list(model.generate(new_state(model), PROMPTS[0], 8, temperature=1.0, seed=3))
    stop = alone(model, PROMPTS[1], 8)[3]
    gens = [model.generate(states[0], PROMPTS[0], 8, temperature=1.0, seed=3),
            model.generate(states[1], PROMPTS[1], 8, stop_ids=[stop])]
    out = [[next(g)] for g in gens]
    while live := [i for i, g in enumerate(gens) if g.batchable]:
        for i, tok in zip(live, model.decode_batch([gens[i] for i in live])):
            out[i].append(tok)
    assert out[0] == ref
    assert out[1] == alone(model, PROMPTS[1], 8)[: out[1].index(stop) + 1]


def test_a_session_continues_normally_after_batched_steps(tiny, vmu):
    model = tiny("qwen2")
    states = states_in(vmu, model, 2)
    first = in_batches(model, states, PROMPTS[:2], 5)
    more = model.forward(states[0], [77]).logits
    ref = new_state(model)
    assert list(model.generate(ref, PROMPTS[0], 5)) == first[0]
    torch.testing.assert_close(more, model.forward(ref, [77]).logits, atol=1e-5, rtol=1e-5)


def test_refusals_change_nothing(tiny, fresh_model, vmu):
    model = tiny("llama")
    s0, s1, s2 = states_in(vmu, model, 3)
    g0, g1 = model.generate(s0, PROMPTS[0], 4), model.generate(s1, PROMPTS[1], 4)
    with pytest.raises(Busy, match="not between decode steps"):
        model.decode_batch([g0, g1])  # neither has prefilled yet
    next(g0), next(g1)
    with pytest.raises(BadArgument, match="distinct"):
        model.decode_batch([g0, g0])
    with pytest.raises(BadArgument, match="distinct"):
        model.decode_batch([])
    s2.set_steering(0, "scale", 0.5)
    g2 = model.generate(s2, PROMPTS[2], 4)
    next(g2)
    assert not g2.batchable
    with pytest.raises(Busy, match="steered"):
        model.decode_batch([g0, g2])
    other = fresh_model("llama")
    g3 = other.generate(new_state(other), PROMPTS[3], 4)
    next(g3)
    with pytest.raises(BadArgument, match="another model"):
        model.decode_batch([g0, g3])
    positions = (s0.position, s1.position)
    assert model.decode_batch([g0, g1]) and (s0.position, s1.position) == (positions[0] + 1, positions[1] + 1)


def test_a_failed_pass_commits_nothing_and_the_generations_go_on_alone(tiny, vmu, monkeypatch):
    model = tiny("gpt2")
    states = states_in(vmu, model, 3)
    gens = [model.generate(s, p, 6) for s, p in zip(states, PROMPTS)]
    first = [next(g) for g in gens]
    before = [(s.position, list(s.unfed_ids)) for s in states]
    arch = model.arch
    real = arch.run_layer

    def boom(i, hidden, *a, **kw):
        if hidden.shape[0] > 1:
            raise RuntimeError("out of memory (test)")
        return real(i, hidden, *a, **kw)

    monkeypatch.setattr(arch, "run_layer", boom)
    with pytest.raises(RuntimeError, match="test"):
        model.decode_batch(gens)
    assert [(s.position, list(s.unfed_ids)) for s in states] == before
    assert all(g.batchable for g in gens)
    monkeypatch.undo()
    rest = [[first[i]] + list(g) for i, g in enumerate(gens)]
    assert rest == [alone(model, p, 6) for p in PROMPTS[:3]]


def test_paged_out_or_paused_states_are_not_batchable(tiny, vmu):
    model = tiny("llama")
    (s0,) = states_in(vmu, model, 1)
    g = model.generate(s0, PROMPTS[0], 3)
    next(g)
    assert g.batchable
    s0.paused_at = 0  # what a pause would leave (never during a generate: only the flag is checked here)
    assert not g.batchable
    s0.paused_at = None
    vmu.page_out(s0.arena).wait()
    vmu.poll()
    assert s0.arena.residency == "host" and not g.batchable
    vmu.page_in(s0.arena).wait()
    vmu.poll()
    assert g.batchable
    g.close()
    assert not g.batchable and not s0.generating


def test_a_sampling_failure_after_the_pass_is_that_generations_alone(tiny, vmu, monkeypatch):
    """The pass commits every state; a row whose sampling then fails closes its own generation only."""
    from djinn.drivers.model import model as model_module

    model = tiny("gpt2")
    states = states_in(vmu, model, 3)
    gens = [model.generate(s, p, 5) for s, p in zip(states, PROMPTS)]
    for g in gens:
        next(g)
    positions = [s.position for s in states]
    real, calls = model_module.sample, []

    def flaky(logits, *a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("sampling failed (test)")
        return real(logits, *a)

    monkeypatch.setattr(model_module, "sample", flaky)
    out = model.decode_batch(gens)
    assert isinstance(out[0], int) and isinstance(out[1], RuntimeError) and isinstance(out[2], int)
    assert [s.position for s in states] == [p + 1 for p in positions]
    assert gens[0].batchable and not gens[1].batchable and gens[2].batchable
    assert not states[1].generating and states[1].unfed_ids == []


def test_model_stat_counts_batched_steps(fresh_model, vmu):
    model = fresh_model("gpt2")
    assert model.stat()["batched_decode"]["steps"] == 0
    in_batches(model, states_in(vmu, model, 4), PROMPTS[:4], 3)
    st = model.stat()["batched_decode"]
    assert st["steps"] == 2 and st["sequences"] == 8


@pytest.mark.parametrize("dims,dtype,word", [
    ((2, 2, 16, 64), torch.bfloat16, torch.int64),  # the usual shapes: 8-byte words
    ((1, 1, 3, 5), torch.bfloat16, torch.int16),  # a 22-byte row: 2-byte words
    ((1, 1, 3, 5), torch.float32, torch.int32),  # a 44-byte row: 4-byte words
])
def test_offsets_count_the_widest_word_the_layout_allows(dims, dtype, word):
    assert _word(ArenaLayout(*dims, dtype)) == word


def test_a_layout_with_odd_rows_decodes_in_batches(vmu, tmp_path):
    """Head size 6 and hidden 30 in bfloat16 give 2-byte words; the batch still matches each alone."""
    from djinn.drivers.model import load_model
    from tests.fakes import save_tiny

    path = save_tiny("llama", tmp_path / "odd", hidden_size=30, num_attention_heads=5, num_key_value_heads=1,
                     head_dim=6, intermediate_size=40)
    model = load_model(str(path), dtype="bfloat16")
    assert BatchDecoder(model.arch, model.layout, model.device, False).word in (torch.int16, torch.int32)
    states = states_in(vmu, model, 3)
    got = in_batches(model, states, PROMPTS[:3], 6)
    assert got == [alone(model, p, 6) for p in PROMPTS[:3]]


def test_a_pass_estimates_its_transient_memory_by_its_buckets(tiny):
    model = tiny("llama")
    one_layer_gather = 8 * 1024 * 2 * model.n_kv_heads * model.head_dim * model.dtype.itemsize
    assert model.batch_nbytes(8, 1000) > one_layer_gather
    assert model.batch_nbytes(5, 1000) == model.batch_nbytes(8, 1000)  # both run at batch 8, keys 1024
    assert model.batch_nbytes(2, 1000) < model.batch_nbytes(8, 1000) < model.batch_nbytes(8, 1100)


def test_an_arena_moved_between_batched_steps_is_found_where_it_went(tiny, vmu):
    """Offsets are inputs of every pass, not baked in: paged out, its old range taken, paged in elsewhere,
    a session goes on decoding in batches token for token."""
    model = tiny("llama")
    states = states_in(vmu, model, 3)
    gens = [model.generate(s, p, 12) for s, p in zip(states, PROMPTS)]
    out = [[next(g)] for g in gens]
    for _ in range(4):
        for i, tok in enumerate(model.decode_batch(gens)):
            out[i].append(tok)
    arena = states[1].arena
    old = arena.offset
    vmu.page_out(arena).wait()
    vmu.poll()
    squatter = vmu.alloc_arena("squatter", arena.nbytes)
    assert squatter.offset == old
    squatter.bytes().fill_(0xFF)
    vmu.page_in(arena).wait()
    vmu.poll()
    assert arena.offset != old
    while live := [i for i, g in enumerate(gens) if g.batchable]:
        for i, tok in zip(live, model.decode_batch([gens[i] for i in live])):
            out[i].append(tok)
    assert out == [alone(model, p, 12) for p in PROMPTS[:3]]
    vmu.free_arena(squatter)
