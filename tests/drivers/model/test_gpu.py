"""CUDA checks: graph-captured decode against the eager path, VMU paging under graphs, timings.

Run on a GPU machine with: python -m pytest tests/drivers/model -m gpu -s -q
(-s shows the timing lines). Skipped where there is no CUDA device.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from djinn.drivers.model import load_model
from tests.fakes import FakeArena, hf_reference, save_tiny

pytestmark = pytest.mark.gpu

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]


@pytest.fixture(scope="module")
def long_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models with 1024 positions, so decode crosses the 256 -> 512 key bucket."""
    root = tmp_path_factory.mktemp("tiny-long")
    return {k: save_tiny(k, root / k, max_position_embeddings=1024) for k in ("gpt2", "llama", "qwen2")}


def _state(model, max_tokens: int):
    return model.new_state(FakeArena(model.arena_nbytes(max_tokens), device=model.device), max_tokens)


def test_cudnn_attention_is_off_after_a_cuda_load(long_dirs):
    load_model(str(long_dirs["gpt2"]), device="cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_forward_on_cuda_matches_hf_on_cpu(long_dirs):
    model = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
    with torch.no_grad():
        expected = hf_reference(long_dirs["llama"])(torch.tensor([PROMPT])).logits[0]
    got = model.forward(_state(model, 64), PROMPT, return_logits="all").logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_graph_decode_matches_eager_decode_fp32(long_dirs, kind):
    """300 teacher-forced steps (crossing the 256 -> 512 bucket), then a short free generation."""
    eager = load_model(str(long_dirs[kind]), device="cuda", dtype="float32")
    graph = load_model(str(long_dirs[kind]), device="cuda", dtype="float32")
    eager.decode_mode = "dynamic"
    assert graph.decode_mode == "graph"
    a, b = _state(eager, 600), _state(graph, 600)
    token = int(torch.argmax(eager.forward(a, PROMPT).logits))
    graph.forward(b, PROMPT)
    for step in range(300):
        la, lb = eager.forward(a, [token]).logits, graph.forward(b, [token]).logits
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        token = int(torch.argmax(la))
    # lone steps replay the model's shared batch graphs (a pass of one): buckets 256 and 512, no StaticDecoder
    assert b.static is None
    assert {k: graph.batch_stat()[k] for k in ("captures", "replays", "sequences")} == {
        "captures": 2, "replays": 300, "sequences": 300}
    assert list(graph.generate(b, [3], 12)) == list(eager.generate(a, [3], 12))
    assert a.arena.used_nbytes == b.arena.used_nbytes


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_graph_decode_bf16_tracks_eager(long_dirs, kind):
    eager = load_model(str(long_dirs[kind]), device="cuda", dtype="bfloat16")
    graph = load_model(str(long_dirs[kind]), device="cuda", dtype="bfloat16")
    eager.decode_mode = "dynamic"
    a, b = _state(eager, 128), _state(graph, 128)
    eager.forward(a, PROMPT)
    graph.forward(b, PROMPT)
    for token in (3, 9, 27):
        la, lb = eager.forward(a, [token]).logits, graph.forward(b, [token]).logits
        torch.testing.assert_close(lb, la, atol=0.1, rtol=0.05)


def test_graphs_with_steering_and_on_a_side_stream(long_dirs):
    eager = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
    graph = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
    eager.decode_mode = "dynamic"
    a, b = _state(eager, 300), _state(graph, 300)
    for s, m in ((a, eager), (b, graph)):
        s.set_steering(1, "scale", 0.7)
        s.set_steering(2, "add", torch.linspace(-0.5, 0.5, m.hidden_size))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tb = list(graph.generate(b, PROMPT, 30))
        b.set_steering(1, "scale", 1.3)  # new value, same layout: replays, no recapture
        tb += list(graph.generate(b, [4], 10))
    stream.synchronize()
    ta = list(eager.generate(a, PROMPT, 30))
    a.set_steering(1, "scale", 1.3)
    ta += list(eager.generate(a, [4], 10))
    assert ta == tb and b.static.captures == 1


def _kv_rows(state, n: int) -> torch.Tensor:
    return state.views().kv[:n].clone()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefill_graphs_are_bitwise_the_eager_prefill(long_dirs, kind, dtype):
    """A fresh sequence's forward is captured the second time its shape comes, then replayed for other
    sessions (other arenas): logits and arena K/V bitwise those of the eager path, pauses included."""
    eager = load_model(str(long_dirs[kind]), device="cuda", dtype=dtype)
    graph = load_model(str(long_dirs[kind]), device="cuda", dtype=dtype)
    eager.decode_mode = "dynamic"
    ref_state = _state(eager, 64)
    ref = eager.forward(ref_state, PROMPT, return_logits="all").logits
    n = len(PROMPT)
    for i in range(3):
        s = _state(graph, 64)
        got = graph.forward(s, PROMPT, return_logits="all").logits
        assert torch.equal(got, ref), f"forward {i}"
        assert torch.equal(_kv_rows(s, n), _kv_rows(ref_state, n)), f"forward {i}"
        assert s.position == n
    stat = graph.stat()["prefill_graphs"]
    assert stat["captures"] == 1 and stat["replays"] == 2 and stat["plans"] == 1
    for layer in (0, 1):
        for i in range(3):  # pause and resume: plans (0..layer) and (layer+1..last)
            s = _state(graph, 64)
            act = graph.forward(s, PROMPT, pause_at=layer, return_activation="all").activation
            got = graph.resume(s, return_logits="all").logits
            assert torch.equal(got, ref), f"layer {layer}, pair {i}"
            assert torch.equal(_kv_rows(s, n), _kv_rows(ref_state, n))
            e = _state(eager, 64)
            assert torch.equal(act, eager.forward(e, PROMPT, pause_at=layer, return_activation="all").activation)
    # A replacement activation goes through the resume plan too.
    s, e = _state(graph, 64), _state(eager, 64)
    act = graph.forward(s, PROMPT, pause_at=0, return_activation="all").activation
    eager.forward(e, PROMPT, pause_at=0)
    assert torch.equal(graph.resume(s, act * 0.9).logits, eager.resume(e, act * 0.9).logits)
    # Steered states and states past position 0 run eagerly: no new plan, no replay.
    before = graph.stat()["prefill_graphs"]
    s = _state(graph, 64)
    s.set_steering(0, "scale", 0.9)
    graph.forward(s, PROMPT)
    t = _state(graph, 64)
    graph.forward(t, PROMPT[:4])
    graph.forward(t, PROMPT[4:])
    after = graph.stat()["prefill_graphs"]
    assert after["replays"] == before["replays"] and after["captures"] == before["captures"]


def test_prefill_plans_shared_by_sessions_on_two_streams(long_dirs):
    """Replays of one plan for two sessions on two streams, queued back to back, each get their own result."""
    eager = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
    graph = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
    eager.decode_mode = "dynamic"
    other = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    want = {tuple(p): eager.forward(_state(eager, 64), p).logits for p in (PROMPT, other)}
    for _ in range(2):
        graph.forward(_state(graph, 64), PROMPT)  # the second one captures
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = []
    for _ in range(4):
        for stream, prompt in zip(streams, (PROMPT, other)):
            with torch.cuda.stream(stream):
                got.append((prompt, graph.forward(_state(graph, 64), prompt).logits))
    torch.cuda.synchronize()
    for prompt, logits in got:
        assert torch.equal(logits, want[tuple(prompt)])


@pytest.mark.parametrize("steered", [False, True])
@pytest.mark.parametrize("home", ["free", "reused", "taken"])
def test_graphs_survive_vmu_paging(long_dirs, home, steered):
    """Paged out and in, decoding goes on token for token. A plain session's lone steps replay the model's
    shared batch graphs, which address arenas by offset: one capture, wherever the arena comes back. A
    steered session's StaticDecoder keeps its graphs back in the old range, also when another arena
    scribbled there meanwhile (its masked rows read as zero); moved (another arena holds the range), it
    captures them again."""
    from djinn.drivers.vmu import VMU

    vmu = VMU("cuda", text_nbytes=64 << 20, data_nbytes=256 << 20, stack_nbytes=64 << 20, host_nbytes=256 << 20)
    try:
        model = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32", vmu=vmu)
        ref = load_model(str(long_dirs["llama"]), device="cuda", dtype="float32")
        ref.decode_mode = "dynamic"
        arena = vmu.alloc_arena("s-gpu", model.arena_nbytes(512))
        state, rstate = model.new_state(arena, 512), _state(ref, 512)
        if steered:
            for s in (state, rstate):
                s.set_steering(1, "scale", 0.9)
        old_offset = arena.offset
        got = list(model.generate(state, PROMPT, 20))
        vmu.page_out(arena).wait()
        vmu.poll()
        squatter = None
        if home != "free":
            squatter = vmu.alloc_arena("squatter", arena.nbytes)
            assert squatter.offset == old_offset
            squatter.bytes().fill_(0xFF)  # NaN patterns where the arena's masked rows were
            if home == "reused":
                vmu.free_arena(squatter)
                torch.cuda.synchronize()  # the fill is done, so the freed range is free again
                squatter = None
        vmu.page_in(arena).wait()
        home_taken = home == "taken"
        assert (arena.offset == old_offset) != home_taken
        got += list(model.generate(state, [7], 20))
        want = list(ref.generate(rstate, PROMPT, 20)) + list(ref.generate(rstate, [7], 20))
        assert got == want
        if steered:
            assert state.static.captures == (2 if home_taken else 1)
        else:
            assert state.static is None and model.batch_stat()["captures"] == 1
        if squatter is not None:
            vmu.free_arena(squatter)
        model.unload()
    finally:
        vmu.close()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_batched_graph_decode_matches_lone_eager_steps_fp32(long_dirs, kind):
    """Four sessions on different streams, 300 teacher-forced batched steps (crossing the 256 -> 512 key
    bucket; one session leaves halfway, leaving a batch of 3 padded to 4), each against the same session
    decoded alone, eagerly."""
    from djinn.drivers.vmu import VMU

    vmu = VMU("cuda", text_nbytes=64 << 20, data_nbytes=256 << 20, stack_nbytes=0, host_nbytes=16 << 20)
    try:
        vmu.data.tensor.fill_(0xFF)  # NaN bytes: a row no one wrote must never be read
        model = load_model(str(long_dirs[kind]), device="cuda", dtype="float32", vmu=vmu)
        ref = load_model(str(long_dirs[kind]), device="cuda", dtype="float32")
        ref.decode_mode = "dynamic"
        prompts = [PROMPT, PROMPT[:3], PROMPT * 5, [9]]
        streams = [torch.cuda.Stream() for _ in prompts]
        states = [model.new_state(vmu.alloc_arena(f"s{i}", model.arena_nbytes(600)), 600) for i in range(4)]
        refs = [_state(ref, 600) for _ in prompts]
        gens, tokens = [], []
        for st, r, p, stream in zip(states, refs, prompts, streams):
            with torch.cuda.stream(stream):
                g = model.generate(st, p, 301)
                tokens.append(next(g))
            gens.append(g)
            assert tokens[-1] == int(torch.argmax(ref.forward(r, p).logits))
        for step in range(300):
            live = [i for i in range(4) if step < 150 or i != 2]
            with torch.cuda.stream(streams[live[0]]):
                got = model.decode_batch([gens[i] for i in live], [streams[i] for i in live])
            for i, tok in zip(live, got):
                want = ref.forward(refs[i], [tokens[i]]).logits
                assert tok == int(torch.argmax(want)), f"session {i}, step {step}"
                tokens[i] = tok
        batch = model.batch_stat()
        assert batch["steps"] == 300 and batch["sequences"] == 150 * 4 + 150 * 3
        assert batch["captures"] == batch["graphs"] and 2 <= batch["graphs"] <= 4
        assert batch["replays"] == 300
        for g in gens:
            g.close()
        model.unload()
    finally:
        vmu.close()


def test_batched_decode_bf16_tracks_lone_graph_steps(long_dirs):
    """In bfloat16, eight sessions teacher-forced through 40 batched steps against twins stepped alone
    (graphs): the logits stay close and the argmax agrees nearly everywhere."""
    from djinn.drivers.model.batch import BatchDecoder
    from djinn.drivers.vmu import VMU

    vmu = VMU("cuda", text_nbytes=64 << 20, data_nbytes=256 << 20, stack_nbytes=0, host_nbytes=16 << 20)
    try:
        model = load_model(str(long_dirs["llama"]), device="cuda", dtype="bfloat16", vmu=vmu)
        prompts = [[(7 * i + j) % 250 + 1 for j in range(5 + 9 * i)] for i in range(8)]
        states = [model.new_state(vmu.alloc_arena(f"s{i}", model.arena_nbytes(128)), 128) for i in range(8)]
        twins = [model.new_state(vmu.alloc_arena(f"t{i}", model.arena_nbytes(128)), 128) for i in range(8)]
        for st, tw, p in zip(states, twins, prompts):
            model.forward(st, p)
            model.forward(tw, p)
        batcher = BatchDecoder(model.arch, model.layout, model.device, use_graphs=True)
        agree = 0
        for step in range(40):
            tokens = [(13 * step + i) % 250 + 1 for i in range(8)]
            with torch.inference_mode():
                got = batcher.step(states, tokens).clone()
            for row, tw, t in zip(got, twins, tokens):
                want = model.forward(tw, [t]).logits
                assert (row - want).abs().max() <= 0.02 * want.abs().max(), f"step {step}"
                agree += int(torch.argmax(row)) == int(torch.argmax(want))
        assert agree >= 0.95 * 8 * 40, f"argmax agrees on {agree} of {8 * 40}"
        model.unload()
    finally:
        vmu.close()


def _step_ms(model, state, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        model.forward(state, [1 + i % 100], return_logits="none" if model.decode_mode == "dynamic" else "last")
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


@pytest.mark.slow
def test_llama_1b_decode_eager_vs_graph_and_plan():
    model = load_model("dummy:llama-1b", device="cuda")
    print(f"\nllama-1b: {model.n_params / 1e9:.2f} B params, {model.text_nbytes / 1e9:.2f} GB text, "
          f"{model.bytes_per_token} B/token, dtype {model.dtype}")
    prompt = list(range(1, 513))
    plan = model.plan("forward", 512, 0)
    # Eager prefills: the plan's figure is for the eager step; a prefill plan's capture, on the second
    # sight of this shape, would add the plan's own memory to the measured peak.
    model.decode_mode = "dynamic"
    model.forward(_state(model, 512), prompt)  # warm-up: cuBLAS workspaces are allocated on first use
    state = _state(model, 1024)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.forward(state, prompt)
    torch.cuda.synchronize()
    real_peak = torch.cuda.max_memory_allocated() - base
    print(f"prefill 512: plan peak {plan.peak_nbytes / 1e6:.1f} MB (cold {plan.cold_s * 1e3:.0f} ms), "
          f"measured peak {real_peak / 1e6:.1f} MB")
    eager_ms = _step_ms(model, state, 30)
    model.decode_mode = "graph"
    _step_ms(model, state, 3)  # capture
    graph_ms = _step_ms(model, state, 30)
    print(f"decode at ~550 tokens: eager {eager_ms:.2f} ms/step, graph {graph_ms:.2f} ms/step")
    assert graph_ms < eager_ms
    assert plan.peak_nbytes >= real_peak * 0.5


@pytest.mark.slow
def test_llama_8b_loads_fast_and_generates():
    t0 = time.perf_counter()
    model = load_model("dummy:llama-8b", device="cuda")
    load_s = time.perf_counter() - t0
    print(f"\nllama-8b: load {load_s:.1f} s, {model.text_nbytes / 1e9:.2f} GB text, {model.bytes_per_token} B/token")
    assert 15e9 < model.text_nbytes < 17e9 and load_s < 60
    state = _state(model, 256)
    assert len(list(model.generate(state, list(range(1, 65)), 16))) == 16
    model.unload()
