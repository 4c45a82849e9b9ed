"""A model's life cycle through the daemon, and how requests of a session behave over one connection.

- load -> session -> unload is refused (EBUSY) while the session is open, and frees the model's Text
  memory once it is closed;
- pipelined requests of one session run in the order they were sent;
- text in, text out on the boot `demo` model (byte tokenizer);
- a client that goes away mid-generate stops the generation and its session is reclaimed.

Every call goes through the socket, as a client's would.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

import djinn
from djinn.drivers.model.tokenizer import BOS_ID, ByteTokenizer
from tests.daemon import session_row
from tests.fakes import save_tiny

PROMPT = [5, 17, 42, 99, 7]


def _until(what: str, predicate: Callable[[], Any], timeout_s: float = 5.0, every_s: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def _model_row(k: Any, name: str) -> dict[str, Any] | None:
    return next((m for m in k.syscall("models")["models"] if m["name"] == name), None)


def _text_used(k: Any) -> int:
    return int(k.stat()["memory"]["segments"]["text"]["used_nbytes"])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return save_tiny("gpt2", tmp_path_factory.mktemp("lifecycle") / "gpt2")


def test_load_session_unload_cycle(kernel, tiny_path):
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    assert _model_row(kernel, name) is None
    text_before = _text_used(kernel)

    loaded = kernel.load_model(str(tiny_path), name=name)
    assert loaded["name"] == name and loaded["spec"] == str(tiny_path) and loaded["sessions"] == 0
    assert loaded["text_nbytes"] > 0
    assert _text_used(kernel) >= text_before + loaded["text_nbytes"]  # the weights live in Text
    assert _model_row(kernel, name)["sessions"] == 0

    s = kernel.open_session(name, max_tokens=32)
    assert s.info["model"] == name and s.info["max_tokens"] == 32
    try:
        assert _model_row(kernel, name)["sessions"] == 1
        assert session_row(kernel, s)["model"] == name
        with pytest.raises(djinn.errors.EBUSY, match="open session"):
            kernel.syscall("unload_model", name=name)
        # The refusal changed nothing: the model is still listed and the session still runs.
        assert _model_row(kernel, name)["sessions"] == 1
        assert s.forward(PROMPT).position == len(PROMPT)
    finally:
        s.close()

    assert _model_row(kernel, name)["sessions"] == 0
    assert kernel.syscall("unload_model", name=name) == {"unloaded": name}
    assert _model_row(kernel, name) is None
    assert all(m["name"] != name for m in kernel.stat()["models"])
    assert _text_used(kernel) == text_before  # the model's Text memory is free again
    with pytest.raises(djinn.errors.ENOENT):
        kernel.open_session(name)
    with pytest.raises(djinn.errors.ENOENT):
        kernel.syscall("unload_model", name=name)
    # The name can be taken again, and the model works as before.
    kernel.load_model(str(tiny_path), name=name)
    try:
        with kernel.open_session(name, max_tokens=32) as again:
            assert again.forward(PROMPT).position == len(PROMPT)
    finally:
        kernel.syscall("unload_model", name=name)
    assert _text_used(kernel) == text_before


def test_pipelined_forwards_keep_their_order(kernel):
    with kernel.open_session(max_tokens=64) as s:
        assert s.forward(PROMPT).position == len(PROMPT)
        tokens = [3 + 11 * i for i in range(10)]
        rids = [kernel.submit("forward", session=s.id, input_ids=[t]) for t in tokens]  # none waited for
        replies = [kernel.result(rid) for rid in rids]
        positions = [r["position"] for r in replies]
        assert positions == [len(PROMPT) + i for i in range(1, 11)], positions
        assert all(r["paused_at"] is None and r["logits"] is not None for r in replies)
        assert session_row(kernel, s)["tokens"] == len(PROMPT) + 10

        # Same tokens one at a time in another session: the pipelined logits are the sequential ones.
        with kernel.open_session(max_tokens=64) as ref:
            ref.forward(PROMPT)
            for tok, got in zip(tokens, replies):
                assert ref.forward([tok]).logits.equal(got["logits"])


def test_text_in_text_out_on_demo(kernel):
    tok = ByteTokenizer()
    info = _model_row(kernel, "demo")
    assert info is not None and info["tokenizer"] is True

    with kernel.open_session("demo", max_tokens=64) as s:
        r = s.forward("hello")
        assert r.position == len("hello") + 1  # BOS, then one token per byte
        assert r.logits is not None and r.logits.shape[-1] == info["vocab_size"]

    n = 12
    prompt_len = len("hello") + 1
    with kernel.open_session("demo", max_tokens=64) as a:
        merged = kernel.syscall("generate", session=a.id, input_ids="hello", max_new_tokens=n, stream=False)
    assert set(merged) >= {"tokens", "text", "position"} and "token" not in merged
    tokens = merged["tokens"]
    assert 1 <= len(tokens) <= n and all(isinstance(t, int) for t in tokens)
    assert merged["position"] == prompt_len + len(tokens)
    assert merged["text"] == "".join(tok.decode([t]) for t in tokens)
    if all(t < 128 for t in tokens):  # one byte per character: the whole decodes the same
        assert merged["text"] == tok.decode(tokens)

    with kernel.open_session("demo", max_tokens=64) as b:
        items = list(kernel.stream("generate", session=b.id, input_ids="hello", max_new_tokens=n, stream=True))
    assert [i["token"] for i in items] == tokens  # greedy: the stream makes the same tokens
    assert [i["position"] for i in items] == [prompt_len + j for j in range(1, len(tokens) + 1)]
    assert all(i["text"] == tok.decode([i["token"]]) for i in items)
    assert "".join(i["text"] for i in items) == merged["text"]

    with kernel.open_session("demo", max_tokens=64) as c:  # text is its byte ids after BOS
        assert c.generate([BOS_ID, *b"hello"], max_new_tokens=n) == tokens


@pytest.mark.daemon(grace_s=0.0)
def test_client_gone_mid_generate_stops_it(fresh_djinnd):
    assert fresh_djinnd.config.grace_s == 0.0
    n = 1000
    with djinn.connect(fresh_djinnd.path) as watcher:
        goner = djinn.connect(fresh_djinnd.path)
        s = goner.open_session("demo", max_tokens=1024)
        stream = s.generate([BOS_ID, *b"a long story"], max_new_tokens=n, stream=True)
        for _ in range(3):
            next(stream)
        row = session_row(watcher, s)
        assert row["connected"] and row["tokens"] < n
        calls_at_close = watcher.stat()["worker"]["calls"]
        goner.close()  # gone mid-stream, the generation still running

        _until("the session to be reclaimed",
               lambda: all(x["id"] != s.id for x in watcher.stat()["sessions"]))
        first = watcher.stat()["worker"]["calls"]
        time.sleep(0.3)
        second = watcher.stat()["worker"]["calls"]
        assert second == first, "the worker still runs calls after the session was reclaimed"
        # It stopped early: a generation run to the end would have made ~n more worker calls.
        assert second - calls_at_close < n // 2, (calls_at_close, second)
        assert _model_row(watcher, "demo")["sessions"] == 0
        assert watcher.stat()["connections"] == 1
        assert watcher.syscall("nop") == {}
        with watcher.open_session("demo", max_tokens=32) as t:  # the daemon carries on
            assert t.forward("ok").position == 3
