"""Session, Result and Checkpoint: what a client holds, over a blocking Kernel connection.

Rules: these are thin. Each method is one syscall; arguments pass through
unchanged and replies are decoded into small frozen records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

    from .client import Kernel

__all__ = ["Session", "Result", "Checkpoint", "result_from_reply"]


@dataclass(frozen=True, slots=True)
class Result:
    """A forward or resume reply. Fields the call did not ask for are None."""

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
    activation: torch.Tensor | None = None
    paused_at: int | None = None
    position: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


def result_from_reply(reply: dict[str, Any]) -> Result:
    topk = reply.get("topk") or {}
    return Result(
        logits=reply.get("logits"),
        topk_ids=topk.get("ids"),
        topk_logits=topk.get("logits"),
        activation=reply.get("activation"),
        paused_at=reply.get("paused_at"),
        position=int(reply.get("position", 0)),
        raw=reply,
    )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint of a session's state in the host pool. `wait()` blocks until the copy is done."""

    id: str
    kernel: Kernel = field(repr=False)

    def wait(self) -> dict[str, Any]:
        return self.kernel.syscall("checkpoint_status", checkpoint=self.id, wait=True)

    @property
    def ready(self) -> bool:
        return bool(self.kernel.syscall("checkpoint_status", checkpoint=self.id)["ready"])

    def free(self) -> None:
        self.kernel.syscall("free_checkpoint", checkpoint=self.id)


class Session:
    """A session on the kernel. Closing it frees its arena and checkpoints."""

    def __init__(self, kernel: Kernel, sid: str, info: dict[str, Any]) -> None:
        self.kernel = kernel
        self.id = sid
        self.info = info

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def _call(self, name: str, **args: Any) -> Any:
        return self.kernel.syscall(name, session=self.id, **args)

    def forward(self, input_ids: Any, *, return_logits: str | int = "last", pause_at: int | None = None,
                return_activation: bool | str = False) -> Result:
        """Run new tokens through the model, appending to the KV cache kept on the server."""
        return result_from_reply(self._call("forward", input_ids=input_ids, return_logits=return_logits,
                                            pause_at=pause_at, return_activation=_act(return_activation, pause_at)))

    def resume(self, activation: torch.Tensor | None = None, *, pause_at: int | None = None,
               return_logits: str | int = "last", return_activation: bool | str = False) -> Result:
        """Continue a paused forward, with the stored activation or a replacement."""
        return result_from_reply(self._call("resume", activation=activation, pause_at=pause_at,
                                            return_logits=return_logits,
                                            return_activation=_act(return_activation, pause_at)))

    def generate(self, input_ids: Any, max_new_tokens: int = 16, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[int] | None = None, stream: bool = False) -> Any:
        """New token ids (a list), or with stream=True an iterator yielding each id as it is made."""
        args = dict(input_ids=input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, stop=list(stop or []))
        if stream:
            return self._stream_tokens(args)
        return self._call("generate", stream=False, **args)["tokens"]

    def _stream_tokens(self, args: dict[str, Any]) -> Iterator[int]:
        for item in self.kernel.stream("generate", session=self.id, stream=True, **args):
            yield int(item["token"])

    def set_steering(self, layer: int, op: str, value: Any) -> None:
        self._call("set_steering", layer=layer, op=op, value=value)

    def clear_steering(self, layer: int | None = None) -> None:
        self._call("clear_steering", layer=layer)

    def signal_phase(self, phase: str, expected_ms: float | None = None, *,
                     wait: bool = True) -> dict[str, Any] | None:
        """Tell the kernel the session's next phase ("IO_WAIT" or "COMPUTE"); returns the policy's reply.

        With wait=False the request is only sent (Kernel.post) and None is returned at once: its reply,
        and any error in it (an unknown phase, say), is dropped, never raised. The session's requests
        still run in the order they were sent, so a later syscall on it sees the phase applied.
        """
        if not wait:
            self.kernel.post("signal_phase", session=self.id, phase=phase, expected_ms=expected_ms)
            return None
        return self._call("signal_phase", phase=phase, expected_ms=expected_ms)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self._call("checkpoint")["checkpoint"], self.kernel)

    def restore(self, checkpoint: Checkpoint | str) -> None:
        self._call("restore", checkpoint=checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint)

    def alloc_arena(self, nbytes: int) -> dict[str, Any]:
        """Reserve the arena of a session that has none, or grow it to `nbytes` (contents kept); returns
        {arena_nbytes, used_nbytes}. EINVAL if `nbytes` is below its size (arenas never shrink)."""
        return self._call("alloc_arena", nbytes=nbytes)

    def free_arena(self) -> None:
        """Free the arena. ENOENT if there is none; EBUSY if it holds a model's KV cache (close instead)."""
        self._call("free_arena")

    def page_out(self) -> dict[str, Any]:
        """Move the arena to the host pool now (state SWAPPED); the next GPU syscall pages it back in."""
        return self._call("page_out")

    def page_in(self) -> dict[str, Any]:
        """Bring a paged-out arena back to the device now, ahead of use."""
        return self._call("page_in")

    def close(self) -> None:
        self._call("close_session")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _act(return_activation: bool | str, pause_at: int | None) -> str:
    if isinstance(return_activation, str):
        return return_activation
    return "all" if return_activation else "none"
