"""Handlers: alloc_arena, free_arena, page_out, page_in."""

from __future__ import annotations

from typing import Any


async def alloc_arena(k: Any, call: Any, *, session: Any, nbytes: int) -> dict[str, Any]:
    return await k.memory.alloc_or_grow(session, nbytes)


async def free_arena(k: Any, call: Any, *, session: Any) -> dict[str, Any]:
    await k.memory.free_arena(session, explicit=True)
    return {"freed": True}


async def page_out(k: Any, call: Any, *, session: Any) -> dict[str, Any]:
    return await k.memory.page_out(session, cause="syscall")


async def page_in(k: Any, call: Any, *, session: Any) -> dict[str, Any]:
    return await k.memory.page_in(session, cause="syscall")
