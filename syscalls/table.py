"""The syscall table: name -> handler, argument schema, flags. Data, not code.

Rules:
- One row per syscall. The dispatcher (kernel/dispatch.py) is written once and
  reads only this table.
- Flags: `session` (the `session` argument is resolved to a Session the caller
  owns, and the session's requests run in order), `gpu` (the work runs on the
  device worker), `mutates` (changes kernel state), `stream` (the handler is an
  async generator; each item is one reply frame), `preauth` (allowed before hello).
- docs/PROTOCOL.md documents every row; tests/syscalls/test_table.py checks that
  the table, the handlers and the document agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import arena, ckpt, exec as exec_, model, phase, session, stat
from .schema import Arg

__all__ = ["Syscall", "TABLE"]


@dataclass(frozen=True, slots=True)
class Syscall:
    name: str
    handler: Callable[..., Any]
    args: tuple[Arg, ...]
    flags: frozenset[str]
    doc: str
    reply: str


def _row(name: str, handler: Callable[..., Any], args: tuple[Arg, ...], flags: str, doc: str) -> Syscall:
    return Syscall(name, handler, args, frozenset(flags.split()), doc, _REPLIES[name])


# What each syscall answers (CBOR map fields; `?` marks fields present only when asked for).
_REPLIES: dict[str, str] = {
    "hello": '{protocol, server, uid, pid, device, model, limits{max_header_nbytes, max_payload_nbytes, max_tensors, max_cbor_depth, max_inflight}}',
    "nop": '{} (empty map)',
    "echo": '{data}: the argument, tensors returned as tensors',
    "stat": 'the stat snapshot (see "The stat snapshot" below)',
    "open_session": '{session, model, max_tokens, arena_nbytes}',
    "close_session": '{closed: session id}',
    "alloc_arena": '{arena_nbytes, used_nbytes}',
    "free_arena": '{freed: true}',
    "page_out": '{residency: "host", nbytes, seconds}',
    "page_in": '{residency: "device", nbytes, seconds}',
    "load_model": '{name, spec, dtype, params, text_nbytes, sessions, layers, hidden_size, vocab_size, max_positions, kv_nbytes_per_token, tokenizer, batched_decode{steps, sequences, graphs, captures, replays}, prefill_graphs{plans, captures, replays}}',
    "unload_model": '{unloaded: name}',
    "models": '{models: [model maps as load_model returns], default}',
    "forward": '{position, paused_at, logits?, topk?{ids, logits}, activation?}',
    "resume": 'as forward',
    "generate": 'streamed: one frame per token {token, position, text?}, then a final {done: true, frames}; not streamed: {tokens: [ids], position, text?}',
    "set_steering": '{layer, op}',
    "clear_steering": '{cleared: layer or "all"}',
    "checkpoint": '{checkpoint: id, nbytes}',
    "checkpoint_status": '{checkpoint, ready, nbytes, seconds, session}',
    "restore": '{restored: id, position, paused_at}',
    "fork": '{session, model, max_tokens, position}',
    "free_checkpoint": '{freed: id}',
    "signal_phase": '{phase, actions: ["PageOut:signal", ...], prefetch_in_ms}',
}


_S = Arg("session", "session", doc="session id")
_LOGITS = Arg("return_logits", "logits", required=False, default="last",
              doc='"last" (default), "all", "none", or k for the top-k ids and logits of the last token')
_ACT = Arg("return_activation", "str", required=False, default="none", choices=("none", "last", "all"),
           doc="with pause_at: the paused activation for all positions, the last one, or none")
_PAUSE = Arg("pause_at", "int", required=False, nullable=True, min=0, doc="stop after this layer (0-based)")

TABLE: dict[str, Syscall] = {s.name: s for s in (
    _row("hello", session.hello, (
        Arg("protocol", "int", doc="the client's protocol version"),
        Arg("client", "str", required=False, default="", doc="free-form client name, for logs"),
        Arg("token", "str", required=False, doc="TCP only: the daemon's tcp_token"),
    ), "preauth", "Handshake: checks the protocol version (and the token over TCP). Must be the first request."),
    _row("nop", session.nop, (), "", "Does nothing; answers an empty map. The null syscall."),
    _row("echo", session.echo, (Arg("data", "any", required=False, doc="any value, tensors included"),),
         "", "Returns its `data` argument unchanged, tensors included."),
    _row("stat", stat.stat, (), "", "A snapshot of the kernel: sessions, memory, models, syscall latencies."),
    _row("open_session", session.open_session, (
        Arg("model", "str", required=False, nullable=True, doc="a loaded model's name; default: the boot model"),
        Arg("max_tokens", "int", required=False, nullable=True, min=1, doc="context length; sizes the arena"),
        Arg("arena_nbytes", "int", required=False, nullable=True, min=1, doc="arena size for a session with no model"),
        Arg("bare", "bool", required=False, default=False, doc="open a session with no model and no arena"),
    ), "mutates gpu", "Opens a session owned by the caller; with a model, reserves its arena."),
    _row("close_session", session.close_session, (_S,), "session mutates gpu",
         "Closes a session: frees its arena, paused state and checkpoints."),
    _row("alloc_arena", arena.alloc_arena, (_S, Arg("nbytes", "int", min=1, doc="arena size in bytes")),
         "session mutates gpu", "Reserves the session's arena, or grows it by moving (contents kept)."),
    _row("free_arena", arena.free_arena, (_S,), "session mutates gpu", "Frees the session's arena."),
    _row("page_out", arena.page_out, (_S,), "session mutates gpu",
         "Copies the arena's used bytes to the host pool and frees its device range (state SWAPPED)."),
    _row("page_in", arena.page_in, (_S,), "session mutates gpu", "Brings a swapped arena back to the device."),
    _row("load_model", model.load_model, (
        Arg("spec", "str", doc="demo, dummy:gpt2, dummy:llama-1b, dummy:llama-8b, or a local HF directory"),
        Arg("name", "str", required=False, nullable=True, doc="name to register it under (default: the spec)"),
        Arg("dtype", "str", required=False, nullable=True, doc="float32, bfloat16 or float16"),
    ), "mutates gpu", "Loads a model's weights into the Text segment once; later loads of the same name share it "
       "(EEXIST if they ask for another spec or dtype). EINVAL for an unknown spec or a directory that is not a "
       "complete checkpoint."),
    _row("unload_model", model.unload_model, (Arg("name", "str"),), "mutates gpu",
         "Unloads a model no session uses (EBUSY otherwise)."),
    _row("models", model.models, (), "", "Lists loaded models."),
    _row("forward", exec_.forward, (
        _S, Arg("input_ids", "ids", doc="token ids (or text where the model has a tokenizer)"),
        _LOGITS, _PAUSE, _ACT,
    ), "session mutates gpu", "Runs the model on new tokens, appending to the session's KV cache."),
    _row("resume", exec_.resume, (
        _S, Arg("activation", "tensor", required=False, nullable=True, doc="replacement for the paused activation"),
        _LOGITS, _PAUSE, _ACT,
    ), "session mutates gpu", "Continues a paused forward from the layer after the pause."),
    _row("generate", exec_.generate, (
        _S, Arg("input_ids", "ids", doc="prompt token ids or text"),
        Arg("max_new_tokens", "int", required=False, default=16, min=1, doc="tokens to generate at most"),
        Arg("temperature", "number", required=False, default=0.0, min=0.0, doc="0 means greedy"),
        Arg("top_p", "number", required=False, default=1.0, min=0.0, min_exclusive=True, max=1.0,
            doc="nucleus sampling mass"),
        Arg("seed", "int", required=False, nullable=True, doc="sampling seed"),
        Arg("stop", "int_list", required=False, default=[], doc="stop token ids"),
        Arg("stream", "bool", required=False, default=False, doc="stream one frame per token"),
    ), "session mutates gpu stream", "Decodes tokens; streamed replies carry one token each. Decode steps of sessions of one model that "
     "wait together run as one batched pass (djinnd --decode-batch); each session keeps its own sampling "
     "and seed, but its logits may differ from a lone run in the last bits (--decode-batch 1 turns it off)."),
    _row("set_steering", exec_.set_steering, (
        _S, Arg("layer", "int", min=0, doc="layer whose output is steered"),
        Arg("op", "str", choices=("add", "scale"), doc="add a vector, or scale by a number or vector"),
        Arg("value", "any", doc="a number (scale) or a tensor of shape [hidden]"),
    ), "session mutates gpu", "Applies a declared operation at a layer on every step until cleared."),
    _row("clear_steering", exec_.clear_steering, (
        _S, Arg("layer", "int", required=False, nullable=True, min=0, doc="one layer, or all when omitted"),
    ), "session mutates gpu", "Removes steering."),
    _row("checkpoint", ckpt.checkpoint, (_S,), "session mutates gpu",
         "Starts copying the session's state to the host pool; returns a checkpoint id at once."),
    _row("checkpoint_status", ckpt.checkpoint_status, (
        Arg("checkpoint", "checkpoint"), Arg("wait", "bool", required=False, default=False, doc="block until copied"),
    ), "", "Whether the checkpoint's copy is done."),
    _row("restore", ckpt.restore, (_S, Arg("checkpoint", "checkpoint")), "session mutates gpu",
         "Puts a checkpoint's state back into the session."),
    _row("fork", ckpt.fork, (Arg("checkpoint", "checkpoint"),), "mutates gpu",
         "Makes a new session, owned by the caller, from a checkpoint."),
    _row("free_checkpoint", ckpt.free_checkpoint, (Arg("checkpoint", "checkpoint"),), "mutates",
         "Frees a checkpoint's host memory."),
    _row("signal_phase", phase.signal_phase, (
        _S, Arg("phase", "str", doc="IO_WAIT or COMPUTE"),
        Arg("expected_ms", "number", required=False, nullable=True, min=0, doc="how long the phase should last"),
    ), "session mutates", "Tells the kernel what the session is about to do; the policy pages accordingly."),
)}
