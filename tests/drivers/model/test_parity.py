"""Our layer loop against plain transformers on the same weights: logits, greedy tokens, activations."""

from __future__ import annotations

import pytest
import torch

from tests.drivers.model.conftest import new_state
from tests.fakes import TINY_KINDS

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 200, 33, 9, 77, 150, 19, 2, 280, 45, 61]


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_chunked_forward_logits_match_hf(tiny, reference, kind, attn):
    model, ref = tiny(kind, attn), reference(kind, attn)
    state = new_state(model, 64)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    chunks = [PROMPT[:7], PROMPT[7:8], PROMPT[8:9], PROMPT[9:]]
    got = torch.cat([model.forward(state, c, return_logits="all").logits for c in chunks])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert state.position == len(PROMPT)


def test_sliding_window_is_in_effect(reference, tiny_dirs):
    """Mistral's window (8) is shorter than the prompt, so it changes the logits: the parity test above
    therefore checks our windowed masks."""
    from tests.fakes import hf_reference

    ref = reference("mistral", "eager")
    unwindowed = hf_reference(tiny_dirs["mistral"], "eager")
    unwindowed.config.sliding_window = None
    with torch.no_grad():
        a = ref(torch.tensor([PROMPT])).logits[0, -1]
        b = unwindowed(torch.tensor([PROMPT])).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_generate_matches_hf(tiny, reference, kind):
    model = tiny(kind, "sdpa")
    state = new_state(model, 64)
    got = list(model.generate(state, PROMPT, 24))
    assert got == hf_greedy(reference(kind, "sdpa"), PROMPT, 24)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_return_modes(tiny, reference, kind):
    model = tiny(kind)
    with torch.no_grad():
        hf_out = reference(kind)(torch.tensor([PROMPT]), output_hidden_states=True)
    full = model.forward(new_state(model), PROMPT, return_logits="all")
    last = model.forward(new_state(model), PROMPT, return_logits="last")
    top = model.forward(new_state(model), PROMPT, return_logits=5)
    none = model.forward(new_state(model), PROMPT, return_logits="none", return_activation="all")
    assert full.logits.shape == (len(PROMPT), model.vocab_size) and full.logits.dtype == torch.float32
    torch.testing.assert_close(last.logits, full.logits[-1], atol=1e-5, rtol=1e-5)
    assert last.topk_ids is None and none.logits is None
    vals, ids = torch.topk(full.logits[-1], 5)
    assert top.topk_ids.tolist() == ids.tolist() and top.logits is None
    torch.testing.assert_close(top.topk_logits, vals, atol=1e-5, rtol=1e-5)
    assert none.activation.shape == (len(PROMPT), model.hidden_size)
    # Our "activation" of a finished forward is the last layer's output before the final norm.
    normed = model.arch.norm(none.activation.unsqueeze(0))[0]
    torch.testing.assert_close(normed, hf_out.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
    assert (full.position, full.paused_at, full.n_tokens) == (len(PROMPT), None, len(PROMPT))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_paused_activation_is_hf_hidden_state(tiny, reference, kind):
    """hidden_states[L + 1] from HF is the output of layer L, which is what a pause at L returns."""
    model = tiny(kind)
    with torch.no_grad():
        hs = reference(kind)(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    for layer in range(model.n_layers - 1):
        r = model.forward(new_state(model), PROMPT, pause_at=layer, return_activation="all")
        torch.testing.assert_close(r.activation, hs[layer + 1][0], atol=1e-5, rtol=1e-5)
        r = model.forward(new_state(model), PROMPT, pause_at=layer, return_activation="last")
        torch.testing.assert_close(r.activation, hs[layer + 1][0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_interleaved_sessions_match_solo_runs(tiny, reference, kind):
    """Five states advanced round-robin, one decode step at a time; each equals its solo run, and the
    first equals HF generate (solo runs equal HF by test_greedy_generate_matches_hf)."""
    model = tiny(kind)
    prompts = [PROMPT[i : 2 * i + 3] for i in range(5)]
    states = [new_state(model, 64) for _ in prompts]
    gens = [model.generate(s, p, 10) for s, p in zip(states, prompts)]
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(10):
        for i, g in enumerate(gens):
            got[i].append(next(g))
    for p, tokens in zip(prompts, got):
        assert tokens == list(model.generate(new_state(model, 64), p, 10))
    assert got[0] == hf_greedy(reference(kind), prompts[0], 10)
