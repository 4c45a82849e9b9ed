"""Prefill plans on CUDA: a fresh sequence's layers run as a captured CUDA graph, replayed for any session.

A prefill step is launch-bound: each layer is tens of small kernels, each paid for in CPU time. A plan
for one (tokens, first layer, last layer) captures those layers once and replays them in one launch.

Rules:
- Only a sequence at position 0 without steering qualifies: it attends over its own fresh K/V alone, so
  the layers read nothing of the arena and the graph needs no session's address. The graph writes its
  K/V into a staging buffer of its own, and a single copy after each replay moves the rows of the layers
  it ran into the session's arena: a graph serves every session and every arena, wherever it lies.
- The same kernels run replayed as eagerly, on the same inputs: a replay's K/V, activations and logits
  are bitwise those of the eager path (a GPU test checks it, pauses included).
- A key is captured the second time it is asked for, never the first: a shape seen once costs no capture.
  At most MAX_GRAPHS plans are kept, least recently used dropped first, and a step whose staging would
  pass MAX_STAGING_NBYTES runs eagerly.
- A plan's buffers (its inputs, its staging K/V, its output and its graph's memory pool) are shared by
  every session. `release()` notes the stream of the plan's last user, whose reads of them are queued
  there. A replay on that same stream needs nothing more: the stream runs in order. A replay on another
  stream first waits, on its own, for what the last user's stream has queued so far (an event recorded
  there and then), so sessions on different streams never overlap on the buffers. That wait may also
  cover work queued on the other stream after the last user's: only a switch of streams pays for it, and
  a plan used from one stream records and waits for no event at all. A plan dropped or closed waits for
  its last user's stream before its graph and memory go.
- This memory lives outside the VMU's segments, like the decode graphs': at most MAX_GRAPHS plans of at
  most MAX_STAGING_NBYTES of staging each, plus their activations.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..cuda import current_stream_id, to_device
from .arch import Arch
from .cache import ArenaCache, ArenaLayout
from .graphs import capture_graph
from .runner import run_layers

__all__ = ["PrefillGraphs", "PrefillPlan"]

log = logging.getLogger("djinn.model")

MAX_GRAPHS = 4  # plans kept per model
MAX_STAGING_NBYTES = 64 << 20  # a larger prefill (tokens x K/V bytes per token) runs eagerly
MAX_SEEN = 256  # keys remembered as seen once; forgotten all at once past this


@dataclass(slots=True)
class _Staging:
    """What `runner.run_layers` needs of a state, over the plan's own staging K/V: position 0, no steering."""

    kv: torch.Tensor  # [tokens, n_layers, 2, n_kv_heads, head_dim]
    cache: ArenaCache
    position: int = 0

    def views(self) -> "_Staging":
        return self

    def apply_steering(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class PrefillPlan:
    """One captured (tokens, first, last): `run()` replays it for a state; `release()` once its output is read."""

    def __init__(self, arch: Arch, layout: ArenaLayout, device: torch.device, n: int, first: int, last: int) -> None:
        self.n, self.first, self.last = n, first, last
        self._arch, self._layout, self._device = arch, layout, device
        self._graph: Any = None
        self._input: torch.Tensor | None = None  # token ids [1, n] (first layer 0), else layer first-1's output
        self._staging: _Staging | None = None
        self._output: torch.Tensor | None = None
        self._user: Any = None  # the stream of the last user, whose reads of the buffers are queued there
        self._user_id: Any = None  # its id (torch's current-stream triple)

    def _buffers(self) -> tuple[torch.Tensor, _Staging]:
        """Fresh input and staging buffers, not initialised (no kernel: made inside the capture, a fill
        would be part of every replay)."""
        lo, dev, n = self._layout, self._device, self.n
        if self.first == 0:
            inp = torch.empty(1, n, dtype=torch.long, device=dev)
        else:
            inp = torch.empty(1, n, lo.hidden, dtype=lo.dtype, device=dev)
        kv = torch.empty(n, lo.n_layers, 2, lo.n_kv_heads, lo.head_dim, dtype=lo.dtype, device=dev)
        return inp, _Staging(kv, ArenaCache(lo.n_layers))

    def capture(self) -> None:
        """Warm up once on the current stream with buffers of its own, then capture with the plan's, which
        are made inside the capture so that they live in the graph's memory pool, not a request's."""
        warm_in, warm_staging = self._buffers()
        if self.first == 0:
            warm_in.zero_()  # token ids the embedding accepts
        run_layers(self._arch, warm_staging, warm_in, self.first, self.last)  # type: ignore[arg-type]
        del warm_in, warm_staging

        def body() -> torch.Tensor:
            self._input, self._staging = self._buffers()
            return run_layers(self._arch, self._staging, self._input, self.first, self.last)  # type: ignore[arg-type]

        self._graph, self._output = capture_graph(body, None)

    def run(self, kv: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Replay for a state at position 0 whose arena K/V view is `kv` ([max_tokens, n_layers, 2, H, D]);
        `source` is the token ids (first layer 0; [n] or [1, n], on the host or the device) or the activation
        [n, hidden] to resume from.
        Writes the layers' K/V rows into `kv` and returns the last layer's output [1, n, hidden], a buffer
        of the plan's: read it, then `release()`."""
        assert self._input is not None and self._staging is not None and self._output is not None
        if self._user_id is not None and self._user_id != current_stream_id(self._device):
            last_user_done = torch.cuda.Event()
            last_user_done.record(self._user)
            torch.cuda.current_stream(self._device).wait_event(last_user_done)
        to_device(source.reshape(self._input.shape), self._device, out=self._input)
        self._graph.replay()
        layers = slice(self.first, self.last + 1)
        kv[: self.n, layers].copy_(self._staging.kv[:, layers])
        return self._output

    def release(self) -> None:
        """The caller has queued its reads of the output and the staging, on its current stream."""
        stream_id = current_stream_id(self._device)
        if stream_id != self._user_id:
            self._user, self._user_id = torch.cuda.current_stream(self._device), stream_id

    def finish(self) -> None:
        """Wait until the last user's stream has run its reads: the plan's graph and memory may then go."""
        if self._user is not None:
            self._user.synchronize()


class PrefillGraphs:
    """A model's prefill plans (see the module rules). Used on the device worker thread only."""

    def __init__(self, arch: Arch, layout: ArenaLayout, device: torch.device) -> None:
        self.arch, self.layout, self.device = arch, layout, device
        self._plans: OrderedDict[tuple[int, int, int], PrefillPlan] = OrderedDict()
        self._seen: set[tuple[int, int, int]] = set()
        self.captures = self.replays = 0

    def plan(self, n: int, first: int, last: int) -> PrefillPlan | None:
        """The plan for `n` fresh tokens through layers first..last, captured now if this is the second time
        it is asked for; None when it runs eagerly this time (first time, or too large)."""
        if n * self.layout.kv_bytes_per_token > MAX_STAGING_NBYTES:
            return None
        key = (n, first, last)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.replays += 1
            return plan
        if key not in self._seen:
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen.add(key)
            return None
        self._seen.discard(key)
        plan = PrefillPlan(self.arch, self.layout, self.device, n, first, last)
        try:
            plan.capture()
        except torch.cuda.OutOfMemoryError:  # no room for the plan's memory: this one runs eagerly
            log.warning("no device memory to capture a prefill plan of %d tokens (layers %d..%d); "
                        "it runs eagerly", n, first, last)
            return None
        self.captures += 1
        self.replays += 1
        self._plans[key] = plan
        if len(self._plans) > MAX_GRAPHS:
            self._plans.popitem(last=False)[1].finish()
        return plan

    def close(self) -> None:
        for plan in self._plans.values():
            plan.finish()
        self._plans.clear()
        self._seen.clear()

    def stat(self) -> dict[str, int]:
        """plans: captured (tokens, first, last) held; captures, replays: since the model was loaded."""
        return {"plans": len(self._plans), "captures": self.captures, "replays": self.replays}

    @staticmethod
    def idle_stat() -> dict[str, int]:
        return {"plans": 0, "captures": 0, "replays": 0}
