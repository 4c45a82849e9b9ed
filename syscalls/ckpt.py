"""Handlers: checkpoint, checkpoint_status, restore, fork, free_checkpoint."""

from __future__ import annotations

from typing import Any


async def checkpoint(k: Any, call: Any, *, session: Any) -> dict[str, Any]:
    ck = await k.memory.checkpoint(session)
    return {"checkpoint": ck.id, "nbytes": ck.nbytes}


async def checkpoint_status(k: Any, call: Any, *, checkpoint: str, wait: bool) -> dict[str, Any]:
    return await k.memory.checkpoint_status(call, checkpoint, wait=wait)


async def restore(k: Any, call: Any, *, session: Any, checkpoint: str) -> dict[str, Any]:
    return await k.memory.restore(call, session, checkpoint)


async def fork(k: Any, call: Any, *, checkpoint: str) -> dict[str, Any]:
    s = await k.memory.fork(call, checkpoint)
    return {"session": s.id, "model": s.model, "max_tokens": s.max_tokens, "position": s.tokens}


async def free_checkpoint(k: Any, call: Any, *, checkpoint: str) -> dict[str, Any]:
    await k.memory.free_checkpoint(call, checkpoint)
    return {"freed": checkpoint}
