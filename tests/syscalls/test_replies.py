"""Real replies against the `Reply:` lines of docs/PROTOCOL.md (the table's reply strings): every field a
reply carries is one the document names, and forward's tensors have the dtypes and shapes it gives."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from djinn.syscalls.table import TABLE


def _documented(name: str) -> set[str]:
    """The field names in a syscall's reply string: `name:` or `name?:`, at any depth."""
    return set(re.findall(r"\b([a-z_]+)\??:", TABLE[name].reply))


def _check(name: str, reply: dict[str, Any], *, like: str | None = None) -> None:
    undocumented = set(reply) - _documented(like or name)
    assert not undocumented, f"{name} answers fields its Reply line does not name: {sorted(undocumented)}"


@pytest.fixture
def replies(kernel: Any) -> dict[str, dict[str, Any]]:
    """One reply of every syscall that a demo-model daemon can make on CPU, by name."""
    k = kernel
    out: dict[str, dict[str, Any]] = {"hello": k.server, "nop": k.syscall("nop"), "echo": k.syscall("echo", data=[1])}
    out["load_model"] = k.syscall("load_model", spec="demo", name="demo-replies")
    out["models"] = k.syscall("models")
    out["unload_model"] = k.syscall("unload_model", name="demo-replies")
    opened = out["open_session"] = k.syscall("open_session", max_tokens=64)
    sid = opened["session"]
    out["forward"] = k.syscall("forward", session=sid, input_ids=[1, 2, 3], return_logits=4)
    out["forward (paused)"] = k.syscall("forward", session=sid, input_ids=[4, 5], pause_at=0, return_activation="all")
    out["resume"] = k.syscall("resume", session=sid, return_logits="all")
    out["generate"] = k.syscall("generate", session=sid, input_ids=[1], max_new_tokens=2)
    streamed = [frame for frame in k.stream("generate", session=sid, input_ids=[1], max_new_tokens=2, stream=True)]
    out["generate (a streamed token)"] = streamed[0]
    out["set_steering"] = k.syscall("set_steering", session=sid, layer=0, op="scale", value=1.0)
    out["clear_steering"] = k.syscall("clear_steering", session=sid)
    ck = out["checkpoint"] = k.syscall("checkpoint", session=sid)
    out["checkpoint_status"] = k.syscall("checkpoint_status", checkpoint=ck["checkpoint"], wait=True)
    out["restore"] = k.syscall("restore", session=sid, checkpoint=ck["checkpoint"])
    forked = out["fork"] = k.syscall("fork", checkpoint=ck["checkpoint"])
    out["free_checkpoint"] = k.syscall("free_checkpoint", checkpoint=ck["checkpoint"])
    out["signal_phase"] = k.syscall("signal_phase", session=sid, phase="IO_WAIT", expected_ms=50)
    out["page_out"] = k.syscall("page_out", session=sid)
    out["page_in"] = k.syscall("page_in", session=sid)
    out["close_session"] = k.syscall("close_session", session=sid)
    k.syscall("close_session", session=forked["session"])
    bare = k.syscall("open_session", bare=True)["session"]
    out["alloc_arena"] = k.syscall("alloc_arena", session=bare, nbytes=1 << 16)
    out["free_arena"] = k.syscall("free_arena", session=bare)
    k.syscall("close_session", session=bare)
    return out


def test_every_reply_field_is_documented(replies: dict[str, dict[str, Any]]) -> None:
    like = {"forward (paused)": "forward", "resume": "forward", "generate (a streamed token)": "generate"}
    for name, reply in replies.items():
        _check(name, reply, like=like.get(name))
    made = {name for name in replies if name in TABLE} | {"stat"}  # stat: its own section, tests/kernel/test_stat_fields.py
    assert made == set(TABLE), f"no reply checked for {sorted(set(TABLE) - made)}"


def test_forward_tensors_are_as_documented(replies: dict[str, dict[str, Any]]) -> None:
    model = next(m for m in replies["models"]["models"] if m["name"] == replies["models"]["default"])
    vocab, hidden = model["vocab_size"], model["hidden_size"]
    topk = replies["forward"]["topk"]
    assert topk["ids"].dtype == torch.int64 and list(topk["ids"].shape) == [4]
    assert topk["logits"].dtype == torch.float32 and list(topk["logits"].shape) == [4]
    assert list(topk["logits"]) == sorted(topk["logits"].tolist(), reverse=True), "best first"
    paused = replies["forward (paused)"]
    assert paused["paused_at"] == 0 and "logits" not in paused
    assert list(paused["activation"].shape) == [2, hidden]
    assert str(paused["activation"].dtype).removeprefix("torch.") == model["dtype"]
    resumed = replies["resume"]
    assert resumed["paused_at"] is None and resumed["logits"].dtype == torch.float32
    assert list(resumed["logits"].shape) == [2, vocab], "n is the tokens of the forward that paused"
    assert resumed["position"] == 5
