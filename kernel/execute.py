"""Running models for sessions: forward, resume, generate, steering.

Rules:
- Arguments arrive validated by schema; here they are checked against the
  model (vocabulary, context left, layer range) before any work is queued, so a
  bad request changes nothing.
- Each model call is one closure on the device worker (via Kernel.on_device),
  which also copies the reply's tensors to host memory, so the loop never waits
  on the device; forward and resume also encode their reply there
  (EncodedReply) and send it when the connection has nothing queued
  (Connection.send_now), so the client need not wait for the loop to wake;
  generate is one worker call per token, so other sessions interleave between
  tokens and a client that goes away stops the loop at the next token; decode
  steps of sessions that wait together run as one batched pass (batching.py).
- Admission: the plan's memory figure for the request is checked against the
  Stack budget before the request runs; a request that cannot fit gets ENOMEM.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import torch

from .errors import EBUSY, ECANCELED, EINVAL, ENOMEM
from .tensors import EncodedReply, encode_reply

if TYPE_CHECKING:
    from .core import Kernel
    from .dispatch import Call
    from .sessions import Session

__all__ = ["Execute"]


class Execute:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    def _model(self, s: Session) -> Any:
        if s.model is None or s.seq is None:
            raise EINVAL(f"session {s.id} has no model; open it with open_session(model=...)")
        return self.k.models.get(s.model).model

    def _ids(self, model: Any, s: Session, input_ids: Any) -> Any:
        """The token ids of one sequence: a list of ints or a 1-D integer tensor (the schema checked the
        kinds), as the driver's check_ids takes them; no conversion here, since it makes its own. Text
        gets the tokenizer's BOS only at the session's start: text sent later continues the context."""
        if isinstance(input_ids, str):
            if model.tokenizer is None:
                raise EINVAL("input_ids: this model has no tokenizer; send token ids", details={"argument": "input_ids"})
            return model.tokenizer.encode(input_ids, add_bos=s.tokens == 0)
        if not isinstance(input_ids, list) and input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise EINVAL(f"input_ids: a session holds one sequence; got a batch of {input_ids.shape[0]}",
                             details={"argument": "input_ids"})
            return input_ids[0]
        return input_ids

    def _check_pause(self, model: Any, pause_at: int | None) -> None:
        if pause_at is not None and not 0 <= pause_at < model.n_layers:
            raise EINVAL(f"pause_at {pause_at} is out of range: the model has layers 0..{model.n_layers - 1}",
                         details={"argument": "pause_at"})

    def _admitted(self, model: Any, s: Session, n_tokens: int, op: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn` behind admission control: the plan's memory figure must fit the Stack budget.

        Runs on the worker, since a cold plan is a run on the meta device.
        """
        budget = self.k.memory.vmu.stack_budget_nbytes
        stack = self.k.memory.vmu.stack
        past = s.tokens

        def admitted() -> Any:
            plan = model.plan(op, n_tokens, past)
            if plan.peak_nbytes > budget:
                raise ENOMEM(f"this request needs about {plan.peak_nbytes} bytes of activations, more than the "
                             f"Stack budget of {budget} bytes; send fewer tokens at a time",
                             details={"requested_nbytes": plan.peak_nbytes, "stack_nbytes": budget})
            if not stack.measured and stack.active is not None:  # CPU: the plan's figure is the request's
                stack.active.reserve(plan.peak_nbytes)
            return fn()

        return admitted

    async def forward(self, s: Session, input_ids: Any, *, return_logits: str | int, pause_at: int | None,
                      return_activation: str, reply_to: Call | None = None) -> dict[str, Any] | EncodedReply:
        model = self._model(s)
        if s.paused_at is not None:
            raise EBUSY(f"session {s.id} is paused at layer {s.paused_at}; resume it first")
        ids = self._ids(model, s, input_ids)
        self._check_pause(model, pause_at)
        fn = functools.partial(self._replied, reply_to, model.forward, s.seq, ids, pause_at=pause_at,
                               return_logits=return_logits, return_activation=return_activation)
        op = "forward_all" if return_logits == "all" else "forward"
        return await self.k.on_device(s, self._admitted(model, s, len(ids), op, fn))

    async def resume(self, s: Session, activation: Any, *, return_logits: str | int, pause_at: int | None,
                     return_activation: str, reply_to: Call | None = None) -> dict[str, Any] | EncodedReply:
        model = self._model(s)
        if s.paused_at is None:
            raise EBUSY(f"session {s.id} is not paused; resume follows forward(pause_at=...)")
        self._check_pause(model, pause_at)
        if pause_at is not None and pause_at <= s.paused_at:
            raise EINVAL(f"pause_at {pause_at} must come after the layer the session is paused at ({s.paused_at})",
                         details={"argument": "pause_at"})
        fn = functools.partial(self._replied, reply_to, model.resume, s.seq, activation, pause_at=pause_at,
                               return_logits=return_logits, return_activation=return_activation)
        return await self.k.on_device(s, fn)

    async def generate(self, s: Session, input_ids: Any, *, max_new_tokens: int, temperature: float, top_p: float,
                       seed: int | None, stop: list[int], peer: Any) -> AsyncIterator[dict[str, Any]]:
        model = self._model(s)
        if s.paused_at is not None:
            raise EBUSY(f"session {s.id} is paused at layer {s.paused_at}; resume it first")
        ids = self._ids(model, s, input_ids)
        made: list[Any] = []  # the generation, as soon as it exists: closed below whatever happens next

        def start() -> int | None:  # the checks, then the prefill and the first id, in one call
            gen = model.generate(s.seq, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_ids=tuple(stop))
            made.append(gen)
            return next(gen, None)

        if peer.closed:
            raise ECANCELED("generate: the client went away")
        tok = model.tokenizer
        try:
            token = await self.k.on_device(s, self._admitted(model, s, len(ids), "forward", start))
            steps = made[0]
            while token is not None:
                item: dict[str, Any] = {"token": int(token), "position": s.tokens}
                if tok is not None:
                    item["text"] = tok.decode([int(token)])
                yield item
                if peer.closed:
                    raise ECANCELED("generate: the client went away")
                token = await self.k.decode_step(s, model, steps)
        finally:
            # A generation stopped early (cancelled, client gone, even during its prefill) leaves the state
            # consistent. The close is queued on the worker behind the call that makes the generation, so
            # it finds it there even when this task was cancelled while that call ran.
            await self.k.on_stream(s, _close_first, made)

    async def set_steering(self, s: Session, layer: int, op: str, value: Any) -> dict[str, Any]:
        model = self._model(s)
        if not 0 <= layer < model.n_layers:
            raise EINVAL(f"layer {layer} is out of range: the model has layers 0..{model.n_layers - 1}",
                         details={"argument": "layer"})
        await self.k.on_device(s, s.seq.set_steering, layer, op, value)
        return {"layer": layer, "op": op}

    async def clear_steering(self, s: Session, layer: int | None) -> dict[str, Any]:
        self._model(s)
        await self.k.on_device(s, s.seq.clear_steering, layer)
        return {"cleared": "all" if layer is None else layer}

    def _replied(self, reply_to: Call | None, step: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> dict[str, Any] | EncodedReply:
        """Run a model step and build its reply, on the worker: its tensors are copied to host memory
        here, so the event loop never waits on the device. With `reply_to` (the request) the reply is
        encoded here too and, when the connection has nothing queued, sent from here, so the client
        need not wait for the loop to wake up; the loop then only does the bookkeeping."""
        out = _result(step(*args, **kwargs))
        if reply_to is None:
            return out
        parts = encode_reply(reply_to.id, out, limits=self.k.limits)
        return EncodedReply(reply_to.id, parts, reply_to.peer.send_now(reply_to.id, parts))


def _close_first(made: list[Any]) -> None:
    if made:
        made[0].close()


def _result(r: Any) -> dict[str, Any]:
    """A model step's result as the reply's map, its tensors in host memory."""
    out: dict[str, Any] = {"position": int(r.position), "paused_at": r.paused_at}
    streams: list[Any] = []
    if r.logits is not None:
        out["logits"] = _on_host(r.logits, streams)
    if r.topk_ids is not None:
        out["topk"] = {"ids": _on_host(r.topk_ids, streams), "logits": _on_host(r.topk_logits, streams)}
    if r.activation is not None:
        out["activation"] = _on_host(r.activation, streams)
    for stream in streams:
        stream.synchronize()
    return out


def _on_host(t: Any, streams: list[Any]) -> Any:
    """`t` in host memory. A CPU tensor as it is (a step's tensors are fresh copies). A CUDA one is
    copied into page-locked memory from torch's caching host allocator, and the stream that copy is
    queued on is added to `streams`, for the caller to wait on once for all of a reply's tensors:
    `.cpu()` would stage each copy through the driver's own buffers and wait for each."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    stream = torch.cuda.current_stream(t.device)
    if stream not in streams:
        streams.append(stream)
    return host
