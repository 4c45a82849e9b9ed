"""Handlers: hello, nop, echo, open_session, close_session.

hello, nop and echo are plain functions: they never wait, so the dispatcher answers
them inline on the loop, without a task (kernel/dispatch.py).
"""

from __future__ import annotations

import hmac
from typing import Any

from djinn.kernel import abi
from djinn.kernel.errors import EACCES, EPROTO


def hello(k: Any, call: Any, *, protocol: int, client: str, token: str | None) -> dict[str, Any]:
    peer = call.peer
    if protocol != abi.PROTOCOL_VERSION:
        peer.close_after_reply = True
        raise EPROTO(f"protocol version mismatch: client speaks {protocol}, djinnd {k.version} speaks "
                     f"{abi.PROTOCOL_VERSION}; upgrade the older side", details={"client": protocol,
                                                                                "server": abi.PROTOCOL_VERSION})
    if peer.kind == "tcp":
        expected = k.config.tcp_token or ""
        if not token or not hmac.compare_digest(token.encode(), expected.encode()):
            peer.close_after_reply = True
            raise EACCES("hello: wrong or missing token for a TCP connection")
        peer.uid = k.config.tcp_token_uid
    peer.authed = True
    return {"protocol": abi.PROTOCOL_VERSION, "server": f"djinnd {k.version}", "uid": peer.uid, "pid": peer.pid,
            "device": k.device_name, "model": k.models.default_name, "limits": {
                "max_header_nbytes": k.limits.max_header_nbytes, "max_payload_nbytes": k.limits.max_payload_nbytes,
                "max_tensors": k.limits.max_tensors, "max_cbor_depth": k.limits.max_cbor_depth,
                "max_inflight": k.limits.max_inflight}}


def nop(k: Any, call: Any) -> dict[str, Any]:
    return {}


def echo(k: Any, call: Any, *, data: Any) -> dict[str, Any]:
    return {"data": data}


async def open_session(k: Any, call: Any, *, model: str | None, max_tokens: int | None, arena_nbytes: int | None,
                       bare: bool) -> dict[str, Any]:
    s = await k.open_session(call, model=model, max_tokens=max_tokens, arena_nbytes=arena_nbytes, bare=bare)
    return {"session": s.id, "model": s.model, "max_tokens": s.max_tokens,
            "arena_nbytes": int(s.arena.nbytes) if s.arena is not None else 0}


async def close_session(k: Any, call: Any, *, session: Any) -> dict[str, Any]:
    await k.close_session(session)
    return {"closed": session.id}
