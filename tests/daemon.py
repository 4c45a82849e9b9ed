"""A live djinnd for tests: the real `serve()` on a temporary socket, in a background thread.

Rules: tests talk to it only through the socket, as clients do; `.kernel` is
exposed for assertions about kernel state and for submitting work to the device
worker directly (the control-latency test).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from djinn.kernel.config import Config


@dataclass
class LiveDaemon:
    config: Config
    kernel: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    exit_code: int | None = None
    error: BaseException | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return self.config.socket_path

    def start(self, timeout_s: float = 120.0) -> LiveDaemon:
        def on_ready(kernel: Any) -> None:
            self.kernel = kernel
            self.loop = asyncio.get_running_loop()
            self._ready.set()

        def run() -> None:
            import uvloop

            from djinn.kernel.boot import serve

            try:
                self.exit_code = uvloop.run(serve(self.config, on_ready=on_ready, install_signals=False))
            except BaseException as e:  # noqa: BLE001 - surfaced to the test that started it
                self.error = e
            finally:
                self._ready.set()

        self.thread = threading.Thread(target=run, name="test-djinnd", daemon=True)
        self.thread.start()
        if not self._ready.wait(timeout_s) or self.kernel is None:
            raise RuntimeError(f"test daemon did not start: {self.error!r} (exit {self.exit_code})")
        return self

    def call_in_loop(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the daemon's loop thread and return its result (for state assertions)."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(timeout=60)

    def stop(self) -> None:
        if self.loop is not None and self.kernel is not None and self.thread and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.kernel.stop)
        if self.thread is not None:
            self.thread.join(timeout=60)


async def _call(fn: Any, *args: Any) -> Any:
    out = fn(*args)
    if asyncio.iscoroutine(out):
        out = await out
    return out


def daemon_config(**overrides: Any) -> Config:
    """A small CPU configuration on a fresh temporary socket."""
    tmp = tempfile.mkdtemp(prefix="djinn-test-")
    cfg = Config(socket=os.path.join(tmp, "djinnd.sock"), model="demo", device="cpu", grace_s=0.0,
                 vmu_text=256 << 20, vmu_data=512 << 20, vmu_stack=256 << 20, vmu_host=512 << 20,
                 max_tokens=256, vmu_session_arena_mb=8, shutdown_timeout_s=2.0, log_level="warning")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def greedy(session: Any, logits: Any, n: int) -> list[int]:
    """Continue `session` greedily, one forward per token, from the last logits it returned."""
    import torch

    out: list[int] = []
    for _ in range(n):
        out.append(int(torch.argmax(logits)))
        logits = session.forward([out[-1]]).logits
    return out


def session_row(k: Any, session: Any) -> dict[str, Any]:
    """The `stat` row of `session`, through the client `k`."""
    return next(x for x in k.stat()["sessions"] if x["id"] == session.id)

