"""SeqState: one sequence's position, pause point and steering, with its KV cache in the session arena.

Rules:
- Owned by the device worker thread; the kernel serialises calls per session.
- `position` tokens are complete in every layer. While paused after layer L, `pending` more tokens
  (positions [position, position+pending)) have K/V written for layers 0..L and their layer-L output
  in the arena's activation slots; layers L+1.. write theirs on resume.
- `unfed_ids` are tokens the sequence already contains but no layer has run yet (the last token a
  `generate` yielded). The next forward runs them first, in the same pass.
- The state never holds arena views across a generation change: `views()` re-takes them, and a swapped
  arena (residency != "device") is never addressed: `views()` raises Busy.
- `snapshot_meta()` / `restore_meta()` carry everything but the arena bytes, which the VMU copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import BadArgument, Busy, NotFound
from .cache import ArenaCache, ArenaLayout, ArenaViews

__all__ = ["SeqState", "Steer", "STEERING_OPS"]

STEERING_OPS = ("add", "scale")


@dataclass(frozen=True, slots=True)
class Steer:
    """A steering op on one layer's output: `add` (h + value) or `scale` (h * value); value is [hidden]."""

    op: str
    value: torch.Tensor


class SeqState:
    """See the module docstring. Made by `LoadedModel.new_state(arena, max_tokens)`."""

    def __init__(
        self, owner: object, fingerprint: str, layout: ArenaLayout, arena: Any, max_tokens: int,
        device: torch.device,
    ) -> None:
        self.owner = owner
        self.fingerprint = fingerprint
        self.layout = layout
        self.arena = arena
        self.max_tokens = max_tokens
        self.device = device
        self.position = 0
        self.paused_at: int | None = None
        self.pending = 0
        self.unfed_ids: list[int] = []
        self._steering: dict[int, Steer] = {}
        self.cache = ArenaCache(layout.n_layers)
        self._views: ArenaViews | None = None
        self.static: Any = None  # graphs.StaticDecoder, built lazily by the model for decode steps
        self.generating = False  # a generate() iterator is between steps on this state

    # -- arena ------------------------------------------------------------------------------------
    def views(self, refresh: bool = False) -> ArenaViews:
        """Typed views of the arena. `refresh=True` (once at the start of every driver call) tells the
        arena that compute is about to use it (`arena.touch()`: the VMU orders this compute after an
        in-flight copy and notes the stream in use); the views are taken again only when the arena's
        generation changed (it moved), which also drops captured graphs. Raises Busy when the arena is
        paged out, NotFound when it was freed."""
        residency = getattr(self.arena, "residency", "device")
        if residency == "none":
            raise NotFound("the session arena was freed")
        if residency != "device":
            raise Busy(f"the session arena is paged out (residency {residency!r}); page it in first")
        gen = int(self.arena.generation)
        views = self._views
        if views is not None and views.generation == gen:
            if refresh:
                self.arena.touch()
            return views
        self._views = views = self.layout.take_views(self.arena, self.max_tokens)  # views touch the arena
        if self.static is not None:
            self.static.invalidate()
        return views

    def mark_written(self, n_tokens: int) -> None:
        """Tell the arena that rows [0, n_tokens) hold data."""
        self.arena.mark_used(n_tokens * self.layout.bytes_per_token)

    @property
    def used_nbytes(self) -> int:
        """Bytes of the arena this sequence needs kept: complete, pending and unfed-to-be rows."""
        return (self.position + self.pending) * self.layout.bytes_per_token

    @property
    def n_tokens(self) -> int:
        """Tokens in the sequence so far, counting pending and unfed ones."""
        return self.position + self.pending + len(self.unfed_ids)

    # -- steering ---------------------------------------------------------------------------------
    @property
    def steering(self) -> Mapping[int, Steer]:
        return dict(self._steering)

    @property
    def has_steering(self) -> bool:
        return bool(self._steering)

    def set_steering(self, layer: int, op: str, value: float | torch.Tensor | list[float]) -> None:
        """Apply `op` with `value` (a scalar or a [hidden] vector) to layer `layer`'s output on every
        forward, resume and decode step until cleared. Raises BadArgument on a bad layer, op or value."""
        self._steering[layer] = self._make_steer(layer, op, value)

    def _make_steer(self, layer: Any, op: Any, value: Any) -> Steer:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layout.n_layers:
            raise BadArgument(f"steering layer must be an int in [0, {self.layout.n_layers - 1}], got {layer!r}")
        if op not in STEERING_OPS:
            raise BadArgument(f"steering op must be one of {STEERING_OPS}, got {op!r}")
        hidden = self.layout.hidden
        try:
            v = torch.as_tensor(value, dtype=torch.float32).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadArgument(f"steering value must be a number or a [{hidden}] vector: {e}") from None
        if v.dim() == 0:
            v = v.expand(hidden)
        if tuple(v.shape) != (hidden,):
            raise BadArgument(f"steering value must be a scalar or shape [{hidden}], got {list(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise BadArgument("steering value must be finite")
        return Steer(op, v.to(device=self.device, dtype=self.layout.dtype).contiguous())

    def clear_steering(self, layer: int | None = None) -> None:
        """Remove the steering of `layer`, or all steering when `layer` is None."""
        if layer is None:
            self._steering.clear()
        else:
            self._steering.pop(layer, None)

    def apply_steering(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        s = self._steering.get(layer)
        if s is None:
            return hidden
        return hidden + s.value if s.op == "add" else hidden * s.value

    # -- pause bookkeeping ------------------------------------------------------------------------
    def discard_pending(self) -> None:
        """Drop a paused forward: its tokens are forgotten (their rows are garbage past `position`)."""
        self.paused_at, self.pending = None, 0

    # -- checkpoint meta --------------------------------------------------------------------------
    def snapshot_meta(self) -> dict[str, Any]:
        """Everything needed, with a copy of the arena's first `used_nbytes` bytes, to rebuild this state."""
        return {
            "fingerprint": self.fingerprint,
            "bytes_per_token": self.layout.bytes_per_token,
            "position": self.position,
            "paused_at": self.paused_at,
            "pending": self.pending,
            "unfed_ids": list(self.unfed_ids),
            "used_nbytes": self.used_nbytes,
            "steering": [
                {"layer": layer, "op": s.op, "value": s.value.detach().to("cpu", copy=True)}
                for layer, s in sorted(self._steering.items())
            ],
        }

    def restore_meta(self, meta: Mapping[str, Any]) -> None:
        """Adopt a snapshot's meta; the arena must already hold the snapshot's bytes.
        Raises BadArgument if the snapshot is of another model/layout or does not fit max_tokens."""
        if self.generating:
            raise Busy("a generate() is in progress on this state")
        try:
            fp, bpt = meta["fingerprint"], int(meta["bytes_per_token"])
            position, pending = int(meta["position"]), int(meta["pending"])
            paused_at = None if meta["paused_at"] is None else int(meta["paused_at"])
            unfed = [int(t) for t in meta["unfed_ids"]]
            steering = [(int(s["layer"]), str(s["op"]), s["value"]) for s in meta["steering"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BadArgument(f"malformed state meta: {e!r}") from None
        if fp != self.fingerprint or bpt != self.layout.bytes_per_token:
            raise BadArgument(f"state meta is for model {fp!r} ({bpt} B/token), not {self.fingerprint!r}")
        if position + pending + len(unfed) > self.max_tokens:
            raise BadArgument(
                f"snapshot holds {position + pending + len(unfed)} tokens; this state allows {self.max_tokens}"
            )
        if (paused_at is None) != (pending == 0) or (
            paused_at is not None and not 0 <= paused_at < self.layout.n_layers
        ):
            raise BadArgument(f"inconsistent pause in state meta: paused_at={paused_at}, pending={pending}")
        steers = {layer: self._make_steer(layer, op, value) for layer, op, value in steering}
        self.position, self.pending, self.paused_at, self.unfed_ids = position, pending, paused_at, unfed
        self._steering = steers
        self._views = None
        if self.static is not None:
            self.static.invalidate()
        if self.used_nbytes:
            self.arena.mark_used(self.used_nbytes)

    def release(self) -> None:
        """Drop views and captured graphs (session close). The arena itself is the kernel's to free."""
        if self.static is not None:
            self.static.close()
            self.static = None
        self._views = None
        self.cache.unbind()

    def __repr__(self) -> str:
        p = f", paused_at={self.paused_at}, pending={self.pending}" if self.paused_at is not None else ""
        return f"SeqState(position={self.position}/{self.max_tokens}{p})"
