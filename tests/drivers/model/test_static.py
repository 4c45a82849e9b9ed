"""Static-shape decode (the CUDA-graph path's math), run eagerly on the CPU."""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from djinn.drivers.errors import BadArgument
from djinn.drivers.model import ArenaLayout, SeqState
from djinn.drivers.model.arch import make_arch
from djinn.drivers.model.graphs import MIN_BUCKET, StaticDecoder
from djinn.drivers.model.plans import MetaArena
from tests.drivers.model.conftest import new_state
from tests.fakes import tiny_config

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


def test_release_drops_the_decoder_and_the_state_stays_usable(fresh_model):
    model = fresh_model("gpt2")
    model.decode_mode = "static"
    state = new_state(model)
    model.forward(state, PROMPT)
    model.forward(state, [1])
    assert state.static is not None
    state.release()
    assert state.static is None
    assert model.forward(state, [2]).position == len(PROMPT) + 2
    with pytest.raises(BadArgument):
        model.decode_mode = "graph" if not torch.cuda.is_available() else "turbo"


class _HostTensorSpy(TorchDispatchMode):
    """Records ops that take or make a tensor off the meta device (a host tensor inside a capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in flat):
            self.host_ops.append(str(func))
        return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_static_step_is_capture_safe(kind, attn):
    """A CPU stand-in for CUDA-graph safety: the whole step runs on the meta device, where any host
    read (.item(), .tolist()) raises and any tensor made on the CPU shows up in the spy."""
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=attn).eval()
    arch = make_arch(hf)
    layout = ArenaLayout(arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.hidden, torch.float32)
    meta = torch.device("meta")
    state = SeqState(object(), "meta", layout, MetaArena(layout.arena_nbytes(64)), 64, meta)
    state.position = 20
    state.set_steering(1, "add", 0.5)
    decoder = StaticDecoder(arch, meta, 64, use_graphs=False)
    with torch.inference_mode(), _HostTensorSpy() as spy:
        logits = decoder.step(state, 7)
    assert logits.device.type == "meta" and logits.shape == (arch.vocab_size,)
    assert spy.host_ops == []
    with _HostTensorSpy() as control:
        torch.ones(1) * 2
    assert control.host_ops  # the spy does see host tensors
