"""Models through the daemon: HF parity, interleaved sessions, pause/resume, steering, checkpoints, fork.

Hugging Face, run in-process on the same saved weights, is the oracle. Every call
goes through the socket, as a client's would.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import djinn
from tests.daemon import greedy
from tests.fakes import hf_reference, save_tiny

KINDS = ("gpt2", "llama")
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]


@pytest.fixture(scope="module")
def tiny(djinnd, tmp_path_factory) -> dict[str, tuple[str, object]]:
    """name -> (model name in the daemon, HF reference) for tiny GPT-2 and Llama models."""
    root = tmp_path_factory.mktemp("exec-models")
    out = {}
    with djinn.connect(djinnd.path) as k:
        for kind in KINDS:
            path = save_tiny(kind, Path(root / kind))
            name = f"tiny-{kind}"
            k.load_model(str(path), name=name)
            out[kind] = (name, hf_reference(path))
    return out


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_hf_generate(kernel, tiny, kind):
    name, hf = tiny[kind]
    with kernel.open_session(name, max_tokens=64) as s:
        assert s.generate(PROMPT, max_new_tokens=12) == _hf_greedy(hf, PROMPT, 12)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_match_hf(kernel, tiny, kind):
    name, hf = tiny[kind]
    with kernel.open_session(name, max_tokens=64) as s:
        got = s.forward(PROMPT, return_logits="all").logits
        ref = _hf_logits(hf, PROMPT)
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
        nxt = s.forward([77]).logits  # the KV cache stayed on the server
        assert torch.allclose(nxt, _hf_logits(hf, PROMPT + [77])[-1], atol=1e-5, rtol=0)


def test_interleaved_sessions_match_hf(djinnd, tiny):
    """Eight sessions on two models, from four threads: every one decodes what HF decodes."""
    prompts = [[3 + (7 * i + j) % 290 for j in range(3 + i)] for i in range(8)]  # no pad/bos/eos ids
    failures: list[str] = []

    def agent(i: int) -> None:
        kind = KINDS[i % 2]
        name, hf = tiny[kind]
        try:
            with djinn.connect(djinnd.path) as k, k.open_session(name, max_tokens=64) as s:
                got = greedy(s, s.forward(prompts[i]).logits, 6)  # token by token, interleaved with the others
                if got != _hf_greedy(hf, prompts[i], 6):
                    failures.append(f"session {i} ({kind}): {got}")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"session {i}: {e!r}")

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


@pytest.mark.parametrize("kind", KINDS)
def test_pause_resume_is_bitwise_for_every_layer(kernel, tiny, kind):
    name, hf = tiny[kind]
    with kernel.open_session(name, max_tokens=64) as ref:
        want = ref.forward(PROMPT).logits
        want_tokens = greedy(ref, want, 8)
    n_layers = kernel.syscall("models")["models"]
    n_layers = next(m["layers"] for m in n_layers if m["name"] == name)
    for layer in range(n_layers):
        with kernel.open_session(name, max_tokens=64) as s:
            r = s.forward(PROMPT, pause_at=layer, return_activation=True)
            assert r.paused_at == layer and r.logits is None
            assert r.activation.shape[0] == len(PROMPT)
            state = next(x for x in kernel.stat()["sessions"] if x["id"] == s.id)
            assert state["state"] == "PAUSED" and state["paused_at"] == layer
            done = s.resume()
            assert done.paused_at is None
            assert torch.equal(done.logits, want), f"layer {layer}"
            assert greedy(s, done.logits, 8) == want_tokens


def test_scaled_activation_changes_logits(kernel, tiny):
    name, _ = tiny["gpt2"]
    with kernel.open_session(name, max_tokens=64) as a, kernel.open_session(name, max_tokens=64) as b:
        clean = a.forward(PROMPT).logits
        r = b.forward(PROMPT, pause_at=1, return_activation=True)
        steered = b.resume(r.activation * 0.9).logits
        assert not torch.allclose(clean, steered)


def test_resume_during_decode_steps(kernel, tiny):
    """Intervene at every decode step: pause after layer 0, resume unchanged, same tokens as plain decode."""
    name, _ = tiny["llama"]
    with kernel.open_session(name, max_tokens=64) as ref, kernel.open_session(name, max_tokens=64) as s:
        want = ref.generate(PROMPT, max_new_tokens=5)
        logits = s.forward(PROMPT).logits
        got = []
        for _ in range(5):
            tok = int(torch.argmax(logits))
            got.append(tok)
            s.forward([tok], pause_at=0, return_activation="last")
            logits = s.resume().logits
        assert got == want


def test_resume_rejects_wrong_activation(kernel, tiny):
    name, _ = tiny["gpt2"]
    with kernel.open_session(name, max_tokens=64) as s:
        s.forward(PROMPT, pause_at=0)
        with pytest.raises(djinn.errors.EINVAL, match="shape"):
            s.resume(torch.zeros(3, 3))
        with pytest.raises(djinn.errors.EINVAL):
            s.resume(torch.zeros(len(PROMPT), 64, dtype=torch.int64))
        with pytest.raises(djinn.errors.EBUSY, match="paused"):
            s.forward([1])
        assert s.resume().paused_at is None  # the session stayed usable


def test_steering_held_on_the_server(kernel, tiny):
    name, _ = tiny["gpt2"]
    with kernel.open_session(name, max_tokens=64) as a, kernel.open_session(name, max_tokens=64) as b:
        clean = a.forward(PROMPT).logits
        b.set_steering(1, "scale", 0.9)
        steered = b.forward(PROMPT).logits
        assert not torch.allclose(clean, steered)
        with pytest.raises(djinn.errors.EINVAL):
            b.set_steering(1, "exec", 1.0)
        with pytest.raises(djinn.errors.EINVAL):
            b.set_steering(99, "add", 1.0)


def test_checkpoint_restore_and_fork(kernel, tiny):
    name, _ = tiny["llama"]
    with kernel.open_session(name, max_tokens=64) as s:
        s.forward(PROMPT)
        ck = s.checkpoint()
        assert ck.wait()["ready"]
        assert any(c["id"] == ck.id for c in kernel.stat()["checkpoints"])
        first = s.generate([9], max_new_tokens=6)
        s.restore(ck)
        assert s.generate([9], max_new_tokens=6) == first
        child = kernel.fork(ck)
        s.forward([200, 201])  # the origin moves on; the child must not see it
        assert child.generate([9], max_new_tokens=6) == first
        child.close()
    assert not any(c["id"] == ck.id for c in kernel.stat()["checkpoints"]), "freed with its session"


def test_paged_out_while_paused_gives_the_same_result(kernel, tiny):
    name, _ = tiny["gpt2"]
    with kernel.open_session(name, max_tokens=64) as ref, kernel.open_session(name, max_tokens=64) as s:
        want = ref.forward(PROMPT).logits
        s.forward(PROMPT, pause_at=1)
        assert s.page_out()["residency"] == "host"
        row = next(x for x in kernel.stat()["sessions"] if x["id"] == s.id)
        assert row["state"] == "SWAPPED" and row["residency"] == "host" and row["paused_at"] == 1
        assert torch.equal(s.resume().logits, want)  # paged back in first


def test_streaming_and_client_gone_mid_stream(djinnd, tiny):
    name, hf = tiny["gpt2"]
    with djinn.connect(djinnd.path) as k, k.open_session(name, max_tokens=64) as s:
        assert list(s.generate(PROMPT, max_new_tokens=6, stream=True)) == _hf_greedy(hf, PROMPT, 6)
    k = djinn.connect(djinnd.path)
    s = k.open_session(name, max_tokens=200)
    stream = s.generate(PROMPT, max_new_tokens=150, stream=True)
    next(stream)
    k.close()  # gone mid-stream
    with djinn.connect(djinnd.path) as k2:
        assert k2.syscall("nop") == {}


def test_bad_model_input(kernel, tiny):
    name, _ = tiny["gpt2"]
    with kernel.open_session(name, max_tokens=16) as s:
        with pytest.raises(djinn.errors.EINVAL, match="vocabulary"):
            s.forward([300])
        with pytest.raises(djinn.errors.EINVAL):
            s.forward([])
        with pytest.raises(djinn.errors.EINVAL, match="max_tokens"):
            s.forward(list(range(17)))
        with pytest.raises(djinn.errors.EINVAL, match="out of range"):
            s.forward([1], pause_at=3)
        with pytest.raises(djinn.errors.EINVAL, match="tokenizer"):
            s.forward("text needs a tokenizer")
        assert s.forward([1, 2]).position == 2  # nothing was written by the failures
    with pytest.raises(djinn.errors.ENOENT):
        kernel.open_session("no-such-model")
    with pytest.raises(djinn.errors.EBUSY):
        with kernel.open_session(name, max_tokens=8):
            kernel.syscall("unload_model", name=name)


def test_arena_exhaustion_is_enomem_and_harmless(kernel, tiny):
    name, _ = tiny["gpt2"]
    with pytest.raises(djinn.errors.ENOMEM) as e:
        kernel.syscall("alloc_arena", session=kernel.open_session(bare=True).id, nbytes=64 << 30)
    assert e.value.retryable and e.value.details["requested_nbytes"] >= 64 << 30
    assert "largest_free_nbytes" in e.value.details
    with kernel.open_session(name, max_tokens=16) as s:
        assert s.forward([1]).position == 1
