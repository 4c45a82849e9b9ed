"""Handlers: forward, resume, generate, set_steering, clear_steering. Each is one call into kernel/execute.py."""

from __future__ import annotations

from typing import Any, AsyncIterator


async def forward(k: Any, call: Any, *, session: Any, input_ids: Any, return_logits: str | int,
                  pause_at: int | None, return_activation: str) -> Any:
    return await k.execute.forward(session, input_ids, return_logits=return_logits, pause_at=pause_at,
                                   return_activation=return_activation, reply_to=call)


async def resume(k: Any, call: Any, *, session: Any, activation: Any, return_logits: str | int,
                 pause_at: int | None, return_activation: str) -> Any:
    return await k.execute.resume(session, activation, return_logits=return_logits, pause_at=pause_at,
                                  return_activation=return_activation, reply_to=call)


async def generate(k: Any, call: Any, *, session: Any, input_ids: Any, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int | None, stop: list[int], stream: bool) -> AsyncIterator[dict[str, Any]]:
    async for item in k.execute.generate(session, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed, stop=stop, peer=call.peer):
        yield item


async def set_steering(k: Any, call: Any, *, session: Any, layer: int, op: str, value: Any) -> dict[str, Any]:
    return await k.execute.set_steering(session, layer, op, value)


async def clear_steering(k: Any, call: Any, *, session: Any, layer: int | None) -> dict[str, Any]:
    return await k.execute.clear_steering(session, layer)
