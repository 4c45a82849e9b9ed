"""Static-shape decode steps over the arena, run eagerly or captured and replayed as CUDA graphs.

On CUDA a plain session's lone step goes through the model's shared batch graphs instead (a pass of
one, batch.py), which need no capture per state; a StaticDecoder serves steered states, arenas outside
the storage those graphs address, and the "static" decode mode (the graph path's math, eagerly).

Rules:
- One `StaticDecoder` per SeqState (graphs bake in that arena's addresses). A step reads its token and
  position from device buffers filled with `fill_` (no host->device copy), writes its K/V row with
  `index_copy_` at the device position, and attends over the first `kv_len` rows with a mask, where
  `kv_len` is a power-of-two bucket (>= MIN_BUCKET, <= max_tokens): one graph per (bucket, steering
  layout), so attention cost follows the sequence length, not max_tokens.
- Masked-out rows are still read by the attention kernels, and 0 * NaN is NaN, so rows at and past
  `position` must hold finite values: they are zeroed once per arena generation (fresh or moved
  storage is garbage). Zeroing does not raise the arena's high-water mark. A page-in back into the
  arena's old range keeps its generation: the VMU zeroes the bytes past the high-water mark itself.
- A generation change (grow by move, a page-in to a new range) and a checkpoint restore drop every
  graph and their pool; the next step re-captures. A page-in to the old range keeps them.
- Graphs of one decoder share one memory pool; graphs of different states never share one, because
  sessions may run on different CUDA streams.
- Capture warms up once on a side stream with the real inputs (the same row is rewritten with the same
  values), then records with capture_error_mode="thread_local": only the device worker thread issues
  CUDA work, but other threads (the event loop) must not break a capture.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .arch import Arch
from .plans import bucket_up
from .state import SeqState

__all__ = ["StaticDecoder", "MIN_BUCKET", "capture_graph", "key_bucket"]

MIN_BUCKET = 256  # smallest key-length bucket; also keeps masks 16-element aligned for fused kernels


def key_bucket(need: int) -> int:
    """The key length a step that needs `need` keys runs at: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, bucket_up(need))


def capture_graph(body: Callable[[], torch.Tensor], pool: Any, stream: Any = None) -> tuple[Any, torch.Tensor]:
    """`body()` captured as a CUDA graph in memory pool `pool` (None: a new one), on `stream` (None:
    torch's side stream), thread-local, so other threads' CUDA calls do not break the capture; the caller
    has warmed it up. Returns the graph and the output tensor its replays write."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        out = body()
    return graph, out


class StaticDecoder:
    """Decode one token at `state.position` with static shapes. `use_graphs` needs a CUDA device."""

    def __init__(self, arch: Arch, device: torch.device, max_tokens: int, use_graphs: bool) -> None:
        if use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        # No reference to the state: it owns this decoder, and a cycle would keep graph memory alive until gc.
        self.arch, self.device, self.max_tokens, self.use_graphs = arch, device, max_tokens, use_graphs
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.arange = torch.arange(max_tokens, device=device)
        self.steer_bufs: dict[int, torch.Tensor] = {}
        self.graphs: dict[tuple[int, tuple[tuple[int, str], ...]], tuple[Any, torch.Tensor]] = {}
        self.pool: Any = None
        self.captures = 0
        self.replays = 0
        self._clean_generation: int | None = None

    def bucket(self, position: int) -> int:
        return min(key_bucket(position + 1), self.max_tokens)

    def invalidate(self) -> None:
        """The arena moved or was rewritten: forget graphs (and their pool) and the clean-tail mark."""
        self.graphs.clear()
        self.pool = None  # a fresh pool for the next capture, rather than an id whose graphs are all gone
        self._clean_generation = None

    def close(self) -> None:
        self.invalidate()

    def _body(self, state: SeqState, kv: torch.Tensor, kv_len: int, layout: tuple[tuple[int, str], ...]
              ) -> torch.Tensor:
        arch = self.arch
        position_ids = self.pos.view(1, 1)
        hidden = arch.embed(self.ids, position_ids)
        masks = arch.static_masks(self.pos, kv_len, self.arange, hidden.dtype)
        ctx = arch.context(hidden, position_ids)
        ops = dict(layout)
        state.cache.bind_static(kv, self.pos, kv_len)
        try:
            for i in range(arch.n_layers):
                hidden = arch.run_layer(i, hidden, masks[arch.windows[i]], state.cache, position_ids, ctx)
                op = ops.get(i)
                if op == "add":
                    hidden = hidden + self.steer_bufs[i]
                elif op == "scale":
                    hidden = hidden * self.steer_bufs[i]
        finally:
            state.cache.unbind()
        return arch.lm_head(arch.norm(hidden))[0, 0].float()

    def _capture(self, state: SeqState, kv: torch.Tensor, kv_len: int, layout: tuple[tuple[int, str], ...]
                 ) -> tuple[Any, torch.Tensor]:
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._body(state, kv, kv_len, layout)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph, out = capture_graph(lambda: self._body(state, kv, kv_len, layout), self.pool)
        if self.pool is None:
            self.pool = graph.pool()
        self.captures += 1
        self.graphs[(kv_len, layout)] = (graph, out)
        return graph, out

    def step(self, state: SeqState, token: int) -> torch.Tensor:
        """Run token `token` at `state.position`; commit it; return float32 logits [vocab] (a fresh tensor)."""
        views = state.views(refresh=True)
        if self._clean_generation != views.generation:
            views.rows[state.position :].zero_()
            self._clean_generation = views.generation
        p = state.position
        self.ids.fill_(token)
        self.pos.fill_(p)
        steering = state.steering
        layout = tuple(sorted((layer, s.op) for layer, s in steering.items()))
        for layer, s in steering.items():
            buf = self.steer_bufs.get(layer)
            if buf is None:
                buf = self.steer_bufs[layer] = torch.empty_like(s.value)
            buf.copy_(s.value)
        kv_len = self.bucket(p)
        if self.use_graphs:
            entry = self.graphs.get((kv_len, layout))
            graph, out = entry if entry is not None else self._capture(state, views.kv, kv_len, layout)
            graph.replay()
            self.replays += 1
            logits = out.clone()
        else:
            logits = self._body(state, views.kv, kv_len, layout)
        state.mark_written(p + 1)
        state.position = p + 1
        state.unfed_ids = []
        return logits
