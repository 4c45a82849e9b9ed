"""Breakpoints, checkpoints and steering through the daemon, on tiny GPT-2 and Llama (fp32, CPU).

The oracle is another session that was never forked, paged or steered: every comparison is bitwise.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import djinn
from tests.daemon import greedy, session_row
from tests.fakes import save_tiny

KINDS = ("gpt2", "llama")
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]
N_LAYERS = 3  # tests.fakes.tiny_config


@pytest.fixture(scope="module")
def tiny(djinnd, tmp_path_factory) -> dict[str, str]:
    """kind -> the name of a tiny model of that family loaded in the shared daemon (unloaded after)."""
    root = tmp_path_factory.mktemp("breakpoint-models")
    names = {}
    with djinn.connect(djinnd.path) as k:
        for kind in KINDS:
            names[kind] = f"bp-{kind}"
            k.load_model(str(save_tiny(kind, Path(root / kind))), name=names[kind])
    yield names
    with djinn.connect(djinnd.path) as k:
        for name in names.values():
            k.syscall("unload_model", name=name)


def _wait_for(check, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_fork_leaves_the_origin_untouched(kernel, tiny, kind):
    """The child runs first, far ahead; then the origin's continuation is the unforked reference's."""
    with kernel.open_session(tiny[kind], max_tokens=64) as ref, kernel.open_session(tiny[kind], max_tokens=64) as s:
        ref.forward(PROMPT)
        want_logits = ref.forward([9]).logits
        want = greedy(ref, want_logits, 6)
        s.forward(PROMPT)
        ck = s.checkpoint()
        child = kernel.fork(ck)
        child.forward([200, 201, 202])
        child.generate([9], max_new_tokens=8)
        child.set_steering(1, "scale", 0.5)  # the child's steering is its own too
        child.forward([9])
        child.close()
        logits = s.forward([9]).logits
        assert torch.equal(logits, want_logits)
        assert greedy(s, logits, 6) == want


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_page_out_while_paused_resumes_bitwise(kernel, tiny, kind, layer):
    with kernel.open_session(tiny[kind], max_tokens=64) as ref, kernel.open_session(tiny[kind], max_tokens=64) as s:
        want_logits = ref.forward(PROMPT).logits
        want = greedy(ref, want_logits, 5)
        s.forward(PROMPT, pause_at=layer)
        assert s.page_out()["residency"] == "host"
        row = session_row(kernel, s)
        assert row["state"] == "SWAPPED" and row["paused_at"] == layer
        done = s.resume()
        assert done.paused_at is None and torch.equal(done.logits, want_logits)
        assert greedy(s, done.logits, 5) == want


@pytest.mark.parametrize("kind", KINDS)
def test_freed_checkpoint_cannot_be_restored(kernel, tiny, kind):
    with kernel.open_session(tiny[kind], max_tokens=64) as s:
        s.forward(PROMPT)
        ck = s.checkpoint()
        assert ck.wait()["ready"]
        ck.free()
        assert not any(c["id"] == ck.id for c in kernel.stat()["checkpoints"])
        with pytest.raises(djinn.errors.ENOENT, match="freed"):
            s.restore(ck)
        with pytest.raises(djinn.errors.ENOENT, match="freed"):
            kernel.fork(ck)
        with pytest.raises(djinn.errors.ENOENT):
            ck.free()
        with pytest.raises(djinn.errors.ENOENT):
            ck.ready  # noqa: B018 - the property is a syscall
        assert s.forward([9]).position == len(PROMPT) + 1  # the session did not notice


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_ready_can_be_polled(kernel, tiny, kind):
    with kernel.open_session(tiny[kind], max_tokens=64) as s:
        s.forward(PROMPT)
        ck = s.checkpoint()
        _wait_for(lambda: ck.ready, "the checkpoint's copy")
        assert ck.ready  # stays ready
        status = ck.wait()
        assert status["ready"] and status["session"] == s.id and status["nbytes"] > 0
        assert status["seconds"] is not None and status["seconds"] >= 0
        assert next(c for c in kernel.stat()["checkpoints"] if c["id"] == ck.id)["ready"]
        first = s.forward([9]).logits
        s.restore(ck)
        assert torch.equal(s.forward([9]).logits, first)


@pytest.mark.parametrize("kind", KINDS)
def test_clear_steering_restores_unsteered_logits(kernel, tiny, kind):
    name = tiny[kind]
    with kernel.open_session(name, max_tokens=64) as clean:
        want = clean.forward(PROMPT).logits
    with kernel.open_session(name, max_tokens=64) as only0:
        only0.set_steering(0, "scale", 0.8)
        want_only0 = only0.forward(PROMPT).logits
    assert not torch.equal(want_only0, want)
    with kernel.open_session(name, max_tokens=64) as s:
        s.set_steering(0, "scale", 0.8)
        s.set_steering(1, "scale", 0.5)
        s.clear_steering(1)  # one layer: layer 0's steering stays
        assert torch.equal(s.forward(PROMPT).logits, want_only0)
    with kernel.open_session(name, max_tokens=64) as s:
        s.set_steering(0, "scale", 0.8)
        s.set_steering(2, "scale", 0.5)
        s.clear_steering()  # all of it
        assert torch.equal(s.forward(PROMPT).logits, want)
        s.clear_steering()  # nothing left to clear: harmless
        assert s.forward([9]).position == len(PROMPT) + 1


@pytest.mark.parametrize("kind", KINDS)
def test_paused_session_paged_out_by_io_wait_resumes_exactly(djinnd, tiny, kind):
    """The shared daemon runs the proactive policy, eager: IO_WAIT pages a paused session out at once."""
    assert djinnd.config.policy == "proactive" and djinnd.config.proactive_mode == "eager"
    with djinn.connect(djinnd.path) as k:
        with k.open_session(tiny[kind], max_tokens=64) as ref:
            want_logits = ref.forward(PROMPT).logits
            want = greedy(ref, want_logits, 5)
        by_signal = k.stat()["memory"]["swap"]["by_cause"]["signal"]
        with k.open_session(tiny[kind], max_tokens=64) as s:
            s.forward(PROMPT, pause_at=1, return_activation=True)
            reply = s.signal_phase("IO_WAIT", expected_ms=60_000)
            assert "PageOut:signal" in reply["actions"]
            # residency reads "host" once the copy is issued; the state is SWAPPED once it is done
            _wait_for(lambda: session_row(k, s)["state"] == "SWAPPED", "the page-out on IO_WAIT")
            row = session_row(k, s)
            assert row["residency"] == "host" and row["paused_at"] == 1
            assert k.stat()["memory"]["swap"]["by_cause"]["signal"] == by_signal + 1
            s.signal_phase("COMPUTE")
            done = s.resume()  # paged back in first
            assert done.paused_at is None and torch.equal(done.logits, want_logits)
            assert greedy(s, done.logits, 5) == want
