"""Session state in the arena: views inside it, the used prefix, moves, paging, snapshots, bad inputs."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy
from tests.drivers.model.conftest import new_state
from tests.fakes import GARBAGE, FakeArena

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 200, 33]


def _inside(t: torch.Tensor, arena: FakeArena) -> bool:
    """Every byte `t` can address lies in the arena's storage."""
    base, end = arena.data.data_ptr(), arena.data.data_ptr() + arena.nbytes
    lo = t.data_ptr()
    hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
    return base <= lo and hi <= end


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_lives_in_the_arena_and_decode_attends_over_it(tiny, kind):
    """A first forward writes its K/V into the arena and may attend over the fresh, contiguous
    copies (same values); every later forward attends over the arena's rows."""
    model = tiny(kind)
    state = new_state(model)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    update = state.cache.update

    def spy(k, v, layer_idx, *a, **kw):
        keys, values = update(k, v, layer_idx, *a, **kw)
        seen.append((layer_idx, keys, values))
        return keys, values

    state.cache.update = spy  # type: ignore[method-assign]
    model.forward(state, PROMPT[:5])
    model.forward(state, PROMPT[5:6])
    assert [s[0] for s in seen] == list(range(model.n_layers)) * 2
    kv = state.views().kv
    for i, (layer, keys, values) in enumerate(seen):
        assert keys.shape[:2] == (1, model.n_kv_heads) and keys.shape[3] == model.head_dim
        if i >= model.n_layers:
            assert _inside(keys, state.arena) and _inside(values, state.arena)
        else:
            assert torch.equal(keys[0].transpose(0, 1), kv[:5, layer, 0])
            assert torch.equal(values[0].transpose(0, 1), kv[:5, layer, 1])
    assert seen[-1][1].shape[2] == 6  # the whole prefix, as [1, heads, T, head_dim]
    views = state.views()
    assert _inside(views.kv, state.arena) and _inside(views.act, state.arena)


def test_used_bytes_are_a_prefix_of_tokens_times_bytes_per_token(tiny):
    model = tiny("llama")
    state = new_state(model, 64)
    arena = state.arena
    bpt = model.bytes_per_token
    assert bpt == (model.n_layers * 2 * model.n_kv_heads * model.head_dim + model.hidden_size) * 4
    model.forward(state, PROMPT)
    assert arena.used_nbytes == len(PROMPT) * bpt
    model.forward(state, [1, 2, 3], pause_at=0)
    assert arena.used_nbytes == (len(PROMPT) + 3) * bpt
    model.resume(state)
    assert arena.used_nbytes == state.position * bpt
    # Nothing past the high-water mark was touched (still the fake's garbage fill).
    assert bool((arena.data[arena.used_nbytes :] == GARBAGE).all())


def test_views_are_retaken_after_the_arena_moves(tiny):
    model = tiny("llama")
    moved, still = new_state(model), new_state(model)
    for s in (moved, still):
        model.forward(s, PROMPT)
    moved.arena.move()
    assert torch.equal(model.forward(moved, [9]).logits, model.forward(still, [9]).logits)
    moved.arena.move()
    assert list(model.generate(moved, [4], 6)) == list(model.generate(still, [4], 6))


def test_views_are_kept_while_the_arena_stays_put(tiny):
    """A driver call on an arena that did not move keeps its views and only touches the arena
    (which orders the call after a copy into it); a move makes new ones."""
    model = tiny("gpt2")
    state = new_state(model)
    model.forward(state, PROMPT)
    views, touches = state.views(), state.arena.touches
    model.forward(state, [9])
    assert state.views() is views and state.arena.touches == touches + 1
    state.arena.move()
    model.forward(state, [10])
    assert state.views() is not views and state.views().generation == state.arena.generation


def test_paged_out_arena_is_never_addressed(tiny):
    model = tiny("gpt2")
    state, ref = new_state(model), new_state(model)
    model.forward(state, PROMPT)
    model.forward(ref, PROMPT)
    state.arena.page_out()
    with pytest.raises(Busy):
        model.forward(state, [9])
    assert state.position == len(PROMPT)
    state.arena.page_in()
    assert torch.equal(model.forward(state, [9]).logits, model.forward(ref, [9]).logits)


@pytest.mark.parametrize("paused", [False, True])
def test_snapshot_bytes_and_meta_round_trip_into_a_new_state(tiny, paused):
    """Fork / checkpoint / page-out-page-in: the used prefix plus the meta rebuild the state exactly."""
    model = tiny("llama")
    src = new_state(model)
    src.set_steering(2, "scale", 0.8)
    gen = model.generate(src, PROMPT, 3)
    tokens = list(gen)
    assert src.unfed_ids == [tokens[-1]]
    if paused:
        model.forward(src, [7, 8], pause_at=1)
    meta, data = src.snapshot_meta(), src.arena.used_bytes()
    assert meta["used_nbytes"] == data.numel() == src.arena.used_nbytes
    dst = model.new_state(FakeArena(model.arena_nbytes(96)), 96)
    dst.arena.load(data)
    dst.restore_meta(meta)
    assert (dst.position, dst.paused_at, dst.pending, dst.unfed_ids) == (
        src.position, src.paused_at, src.pending, src.unfed_ids)
    assert dst.steering.keys() == {2}
    if paused:
        assert torch.equal(model.resume(dst).logits, model.resume(src).logits)
    assert list(model.generate(dst, [5], 6)) == list(model.generate(src, [5], 6))


def test_restore_meta_refuses_a_foreign_or_oversized_snapshot(tiny):
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    src = new_state(llama)
    llama.forward(src, PROMPT)
    meta = src.snapshot_meta()
    with pytest.raises(BadArgument):
        new_state(gpt2).restore_meta(meta)
    with pytest.raises(BadArgument):
        llama.new_state(FakeArena(llama.arena_nbytes(8)), 8).restore_meta(meta)
    with pytest.raises(BadArgument):
        new_state(llama).restore_meta({"position": 1})
    with pytest.raises(BadArgument):
        new_state(llama).restore_meta(dict(meta, paused_at=0))  # paused with nothing pending


@pytest.mark.parametrize("call", [
    lambda m, s: m.forward(s, [m.vocab_size]),
    lambda m, s: m.forward(s, [-1]),
    lambda m, s: m.forward(s, []),
    lambda m, s: m.forward(s, torch.tensor([[1.0, 2.0]])),
    lambda m, s: m.forward(s, torch.tensor([[1, 2], [3, 4]])),
    lambda m, s: m.forward(s, "hello"),
    lambda m, s: m.forward(s, [True, 2]),
    lambda m, s: m.forward(s, list(range(1, 33))),  # past max_tokens (16 in use + 32 > 40)
    lambda m, s: m.forward(s, [1], pause_at=m.n_layers),
    lambda m, s: m.forward(s, [1], pause_at=True),
    lambda m, s: m.forward(s, [1], return_logits=0),
    lambda m, s: m.forward(s, [1], return_logits=m.vocab_size + 1),
    lambda m, s: m.forward(s, [1], return_logits="everything"),
    lambda m, s: m.forward(s, [1], return_activation="first"),
    lambda m, s: m.generate(s, [1], 0),
    lambda m, s: m.generate(s, [1], 25),  # 16 + 1 + 25 - 1 > 40
    lambda m, s: m.generate(s, [1], 3, temperature=-1.0),
    lambda m, s: m.generate(s, [1], 3, top_p=0.0),
    lambda m, s: m.generate(s, [1], 3, seed=1.5),
    lambda m, s: m.generate(s, [1], 3, stop_ids=[m.vocab_size]),
    lambda m, s: m.resume(s),  # not paused: Busy
])
def test_bad_inputs_are_refused_before_anything_is_written(tiny, call):
    model = tiny("gpt2")
    state, ref = new_state(model, 40), new_state(model, 40)
    model.forward(state, list(range(16)))
    model.forward(ref, list(range(16)))
    before = state.arena.data.clone()
    with pytest.raises((BadArgument, Busy)):
        call(model, state)
    assert torch.equal(state.arena.data, before)
    assert (state.position, state.paused_at, state.unfed_ids, state.generating) == (16, None, [], False)
    assert torch.equal(model.forward(state, [7]).logits, model.forward(ref, [7]).logits)


def test_states_are_bound_to_their_model_and_arena_size(tiny):
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    with pytest.raises(BadArgument):
        gpt2.forward(new_state(llama), [1])
    with pytest.raises(BadArgument):
        llama.new_state(FakeArena(llama.arena_nbytes(16) - 1), 16)
    with pytest.raises(BadArgument):
        llama.new_state(FakeArena(llama.arena_nbytes(4)), llama.max_positions + 1)
    with pytest.raises(BadArgument):
        llama.arena_nbytes(0)


def test_real_vmu_arena(tiny):
    """The same mechanism on the VMU's own Arena (CPU): views in the Data segment, paging, generations."""
    vmu_mod = pytest.importorskip("djinn.drivers.vmu")
    model = tiny("llama")
    vmu = vmu_mod.VMU("cpu", text_nbytes=1 << 20, data_nbytes=8 << 20, stack_nbytes=1 << 20, host_nbytes=8 << 20)
    try:
        arena = vmu.alloc_arena("s-1", model.arena_nbytes(64))
        state, ref = model.new_state(arena, 64), new_state(model, 64)
        for s in (state, ref):
            model.forward(s, PROMPT)
        assert arena.used_nbytes == len(PROMPT) * model.bytes_per_token
        data = vmu.data.tensor
        kv = state.views().kv
        assert data.data_ptr() <= kv.data_ptr() < data.data_ptr() + data.numel()
        vmu.page_out(arena).wait()
        with pytest.raises(Busy):
            model.forward(state, [9])
        vmu.page_in(arena).wait()
        assert torch.equal(model.forward(state, [9]).logits, model.forward(ref, [9]).logits)
        host = vmu.snapshot(arena)
        host.wait()
        meta = state.snapshot_meta()
        child_arena = vmu.alloc_arena("s-2", model.arena_nbytes(64))
        vmu.restore(child_arena, host).wait()
        child = model.new_state(child_arena, 64)
        child.restore_meta(meta)
        assert list(model.generate(child, [3], 5)) == list(model.generate(state, [3], 5))
    finally:
        vmu.close()
