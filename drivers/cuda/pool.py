"""StreamPool: the compute streams of one device, each session's work on one of them.

Rules:
  - The device worker is the only thread that launches compute. Every call it runs for a
    session runs with that session's stream current (`call_on`), so one session's work stays
    in order on its stream, and the kernels of sessions on different streams may overlap on
    the device where one alone would leave it idle.
  - A session is given a stream when it opens (`acquire`: the stream fewest open sessions
    use) and gives it back when it closes (`release`). Both are bookkeeping only, done on the
    loop thread; `call_on` runs on the worker.
  - Work not tied to a session (loading a model, booting the VMU) runs on the worker's default
    stream, and whoever does it waits for it before any session may use its result (a loaded
    model's weights): pool streams do not wait on the default stream by themselves.
  - What crosses from one session's stream to another's, or to a copy stream, is ordered by
    events: the VMU records one on the stream an arena was last used on (`Arena._stream`).
  - On CPU there are no streams: `acquire` gives None and `call_on` just calls.
  - The switch uses the C entry points behind `torch.cuda.set_stream`, on plain ids, when this
    build of torch has them: `with torch.cuda.stream(s)` builds Stream objects for the streams it
    saves and restores, in Python, on every call.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from ..errors import BadArgument

__all__ = ["StreamPool", "current_stream_id"]

T = TypeVar("T")

_GET_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)


def current_stream_id(device: torch.device) -> Any:
    """The current stream of CUDA `device` on this thread as a plain, comparable id (torch's triple of
    stream id, device index and device type), without building a Stream object in Python."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _GET_STREAM is None:  # pragma: no cover - a torch without the C entry point
        return torch.cuda.current_stream(index).cuda_stream
    return _GET_STREAM(index)


class StreamPool:
    """`n` compute streams of `device` (none on CPU)."""

    def __init__(self, device: torch.device, n: int) -> None:
        if n < 1:
            raise BadArgument(f"a stream pool needs at least one stream, got {n}")
        self.device = device
        self.streams: list[Any] = []
        if device.type == "cuda":
            self.streams = [torch.cuda.Stream(device=device) for _ in range(n)]
        self.users = [0] * len(self.streams)  # open sessions per stream; loop thread only
        self._ids = [(s.stream_id, s.device_index, s.device_type) for s in self.streams]
        self._index = self.streams[0].device_index if self.streams else None
        c = torch._C
        self._fast = hasattr(c, "_cuda_getCurrentStream") and hasattr(c, "_cuda_setStream")

    def acquire(self) -> int | None:
        """The index of the stream the fewest sessions use (the lowest on a tie), now one more; None on CPU."""
        if not self.streams:
            return None
        users = self.users
        i = users.index(min(users))
        users[i] += 1
        return i

    def release(self, index: int | None) -> None:
        """Give back a stream `acquire` gave."""
        if index is not None:
            self.users[index] -= 1

    def call_on(self, index: int | None, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) with stream `index` current on this thread (as it was before, after); fn(*args) for None."""
        if index is None:
            return fn(*args)
        if not self._fast:  # pragma: no cover - a torch without the C entry points
            with torch.cuda.stream(self.streams[index]):
                return fn(*args)
        c = torch._C
        prev = c._cuda_getCurrentStream(self._index)  # (stream_id, device_index, device_type)
        c._cuda_setStream(*self._ids[index])
        try:
            return fn(*args)
        finally:
            c._cuda_setStream(*prev)

    def stream(self, index: int | None) -> Any:
        """The torch Stream at `index` (None for None)."""
        return None if index is None else self.streams[index]

    def snapshot(self) -> dict[str, Any]:
        return {"streams": len(self.streams), "sessions_per_stream": list(self.users)}
