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


# What each syscall answers: the fields of its `result` map, each `name: type`. `?` marks a field present
# only when asked for. Tensors travel as tensors (see Tensors), described as dtype [shape].
_REPLIES: dict[str, str] = {
    "hello": ('{protocol: int, the protocol version the server speaks; server: text, "djinnd X.Y.Z"; '
              "uid: int, the caller's uid as the daemon sees it (over TCP: tcp_token_uid); pid: int, the daemon's "
              "process id; device: text, e.g. \"cuda:0 (NVIDIA H100 80GB HBM3)\" or \"cpu\"; model: text or null, "
              "the default model; limits: {max_header_nbytes, max_payload_nbytes, max_tensors, max_cbor_depth, "
              "max_inflight: int each}, the limits in force}"),
    "nop": "{} (an empty map)",
    "echo": "{data: the argument as it was sent (null when it was left out), tensors returned as tensors}",
    "stat": 'the stat snapshot, one map (see "The stat snapshot" below)',
    "open_session": ("{session: text, the new session's id; model: text, or null for a bare session; "
                     "max_tokens: int; arena_nbytes: int, the bytes of device memory its arena holds}"),
    "close_session": "{closed: text, the session's id}",
    "alloc_arena": "{arena_nbytes: int, the arena's size; used_nbytes: int, the bytes of it in use}",
    "free_arena": "{freed: true}",
    "page_out": ('{residency: "host"; nbytes: int, the bytes copied out (0 when it was on the host already); '
                 "seconds: float, how long the copy took}"),
    "page_in": '{residency: "device"; nbytes: int, the bytes copied in (0 when already resident); seconds: float}',
    "load_model": ("{name: text; spec: text; dtype: text, e.g. \"bfloat16\"; params: int; text_nbytes: int, its "
                   "weights' bytes in the text segment; sessions: int, sessions open on it; layers: int; "
                   "hidden_size: int; vocab_size: int; max_positions: int; kv_nbytes_per_token: int; "
                   "tokenizer: bool, whether input_ids may be text; batched_decode: {steps, sequences, graphs, "
                   "captures, replays: int each}; prefill_graphs: {plans, captures, replays: int each} "
                   '(see "The stat snapshot")}'),
    "unload_model": "{unloaded: text, the model's name}",
    "models": "{models: array of maps, one per loaded model as load_model returns it; default: text or null}",
    "forward": ("{position: int, the tokens the session holds after the call; paused_at: int, the layer it "
                "stopped after, or null when it ran to the end; logits?: float32 tensor, [vocab_size] for "
                "return_logits \"last\", [n, vocab_size] for \"all\" (n: the tokens this call ran); topk?: "
                "{ids: int64 tensor [k], logits: float32 tensor [k]}, for return_logits k, best first; "
                "activation?: tensor in the model's dtype, [n, hidden_size] for return_activation \"all\", "
                "[hidden_size] for \"last\"}. A call that pauses returns no logits"),
    "resume": "as forward; n is the tokens of the forward that paused",
    "generate": ("not streamed: {tokens: array of int, the new token ids; position: int; text?: text, their text "
                 "where the model has a tokenizer}. Streamed (stream: true): one frame per new token, "
                 "{token: int; position: int; text?: text, that token's text}, then a final frame "
                 "{done: true; frames: int, the token frames sent}"),
    "set_steering": "{layer: int; op: text}",
    "clear_steering": '{cleared: int, the layer, or "all"}',
    "checkpoint": "{checkpoint: text, the new checkpoint's id; nbytes: int, the bytes it holds}",
    "checkpoint_status": ("{checkpoint: text; ready: bool, whether its copy to host memory has finished; "
                          "nbytes: int; seconds: float, how long the copy took, or null until ready; session: text, "
                          "the session it was taken of}"),
    "restore": "{restored: text, the checkpoint's id; position: int; paused_at: int or null}",
    "fork": "{session: text, the new session's id; model: text; max_tokens: int; position: int}",
    "free_checkpoint": "{freed: text, the checkpoint's id}",
    "signal_phase": ('{phase: text; actions: array of text, what the memory policy did at once, each '
                     '"PageOut:<cause>" or "PageIn:<cause>"; prefetch_in_ms: float, when the policy will page '
                     "the session back in ahead of its expected end, or null}"),
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
