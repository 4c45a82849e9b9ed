"""Cross-session batched decode: one token for each of several sequences in one pass over the weights.

A decode step reads every weight once to make one token, so a step for eight sequences costs little
more than a step for one. `BatchDecoder.step(states, tokens)` runs that pass for sequences of one
model whose KV caches live in different session arenas, at different positions.

Rules:
- Every arena is a range of the Data segment, one storage. A step addresses sequence b's K/V row t
  by offset into that storage: `base_b + t * row + layer * width`, where `width` is one layer's K and
  V in a token's row (2 * kv_heads * head_dim elements). New rows are written through a flat view of
  the storage (`index_copy_`); past rows are read through an overlapping view of it (`as_strided`,
  row stride 1), one gather per layer that yields `[B, L, width]`: K then V, as a token's row holds
  them. No cache is moved. Offsets count words of 8 bytes where the layout's sizes allow it (else 4,
  2, then single elements): the gather then moves a word per index, not a 2-byte element.
- Key t of sequence b is read from row min(t, position_b). Keys past a sequence's position are masked
  out; pointing them at its own newest row keeps them finite (0 * NaN is NaN) without zeroing anything.
- Shapes are static per (batch bucket, key bucket): the batch is rounded up to a power of two, the
  padding rows repeating the first sequence (they write its row with the same values), and the keys
  to a power of two >= MIN_BUCKET. On CUDA, with `use_graphs`, each pair is captured once as a graph
  and replayed. All of a model's batch graphs share one memory pool and replay on one stream of the
  decoder's own, which waits before a step for the caller's stream, the streams the caller names and
  the stream each arena was last used on; all of those wait for it after.
- Nothing is committed until the pass has run: a failure leaves every state as it was (a row past a
  position may hold partial K/V, which nothing reads).
- Sequences with steering are not batched (their per-layer ops differ): `batchable()` says so, and
  the caller runs them alone.
- The model also runs a plain state's lone decode step on CUDA as a pass of one here
  (LoadedModel._static_step), when `addresses(state)`: its arena is in the storage the graphs address.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import Busy, NotFound
from .arch import Arch
from .cache import ArenaLayout
from .graphs import capture_graph, key_bucket
from .plans import bucket_up
from .state import SeqState

__all__ = ["BatchCache", "BatchDecoder"]


MIN_INPUT_ROWS = 64  # the input buffers' first size: growing them drops every captured graph


class _BatchLayer(CacheLayerMixin):
    """Per-layer face of BatchCache (transformers' Cache wants one per layer; the layers only call update)."""

    is_sliding = False

    def __init__(self, cache: "BatchCache", layer_idx: int) -> None:
        super().__init__()
        self._cache, self._layer_idx, self.is_initialized = cache, layer_idx, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self._cache.update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # masks are the decoder's own
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class BatchCache(Cache):
    """The transformers Cache of a batched step: writes each sequence's new row, returns every
    sequence's keys and values [B, kv_heads, L, head_dim] gathered from the Data segment."""

    def __init__(self, layout: ArenaLayout, word: torch.dtype) -> None:
        super().__init__(layers=[_BatchLayer(self, i) for i in range(layout.n_layers)])
        self.kv_heads, self.head_dim, self.dtype, self.word = layout.n_kv_heads, layout.head_dim, layout.dtype, word
        self.width = 2 * layout.n_kv_heads * layout.head_dim * layout.dtype.itemsize // word.itemsize  # in words
        self._flat: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._read: torch.Tensor | None = None
        self._write: torch.Tensor | None = None

    def bind(self, flat: torch.Tensor, rows: torch.Tensor, read: torch.Tensor, write: torch.Tensor) -> None:
        """`flat`: the segment's words; `rows`: its overlapping [n, width] view; `read` [B, L] and
        `write` [B * width] word offsets of layer 0's keys to read and of the new rows to write."""
        self._flat, self._rows, self._read, self._write = flat, rows, read, write

    def unbind(self) -> None:
        self._flat = self._rows = self._read = self._write = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        flat, rows, read, write = self._flat, self._rows, self._read, self._write
        if flat is None or rows is None or read is None or write is None:
            raise RuntimeError("BatchCache used outside a bound step (driver bug)")
        b, h, d = key_states.shape[0], self.kv_heads, self.head_dim
        shift = layer_idx * self.width
        new = torch.cat((key_states.reshape(b, h * d), value_states.reshape(b, h * d)), dim=1)
        flat.index_copy_(0, write + shift, new.view(self.word).reshape(-1))
        kv = rows[read + shift].view(self.dtype)  # [B, L, 2 * h * d]: K then V of every key
        keys = kv[:, :, : h * d].unflatten(2, (h, d)).transpose(1, 2)
        values = kv[:, :, h * d :].unflatten(2, (h, d)).transpose(1, 2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def _word(layout: ArenaLayout) -> torch.dtype:
    """The widest integer type (8, 4 or 2 bytes, none narrower than the model dtype) whose size divides
    a token's row and one layer's K: every offset is then a whole number of words (arenas start on
    256-byte boundaries). The model dtype itself when none does."""
    item = layout.dtype.itemsize
    row, half = layout.row_elems * item, layout.n_kv_heads * layout.head_dim * item
    for word in (torch.int64, torch.int32, torch.int16):
        if word.itemsize >= item and row % word.itemsize == 0 and half % word.itemsize == 0:
            return word
    return layout.dtype


class BatchDecoder:
    """Batched decode steps for one model (see the module rules). Used on the device worker thread only."""

    def __init__(self, arch: Arch, layout: ArenaLayout, device: torch.device, use_graphs: bool) -> None:
        if use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.arch, self.layout, self.device, self.use_graphs = arch, layout, device, use_graphs
        self.word = _word(layout)
        self.per_word = self.word.itemsize // layout.dtype.itemsize  # model-dtype elements per word
        self.cache = BatchCache(layout, self.word)
        self.row_words = layout.row_elems // self.per_word
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool: Any = None
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._storage: tuple[int, int] | None = None  # (data_ptr, nbytes) the views below address
        self._flat: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._cap = 0  # rows of the input buffers
        self._inputs: torch.Tensor | None = None  # [3, cap] long: token, position, base word offset
        self._staging: torch.Tensor | None = None  # its host twin (page-locked on CUDA)
        # Graphs read these buffers by address, so they are made once, large enough for every step:
        # the key positions of the largest key bucket, and the offsets of one layer's K and V in a row.
        self._arange = torch.arange(max(key_bucket(arch.max_positions), self.cache.width), device=device)
        self._copied: Any = None  # CUDA event: the inputs' copy out of the staging buffer is done
        self.steps = self.sequences = self.captures = self.replays = 0

    # -- facts ------------------------------------------------------------------------------------
    @staticmethod
    def batchable(state: SeqState) -> bool:
        """Whether `state` may decode in a batch: not paused, no steering, its arena on the device."""
        return (state.paused_at is None and not state.steering
                and getattr(state.arena, "residency", "device") == "device")

    def addresses(self, state: SeqState) -> bool:
        """Whether a pass for `state` keeps the captured graphs: its arena lives in the storage they address
        (in djinnd every arena is in the Data segment), or none is bound yet. A state without a device
        arena is left to the caller's checks (False)."""
        if self._storage is None:
            return True
        try:
            storage = state.views().rows.untyped_storage()
        except (Busy, NotFound):
            return False
        return (storage.data_ptr(), storage.nbytes()) == self._storage

    def close(self) -> None:
        self.graphs.clear()
        self.pool = None
        self._storage = self._flat = self._rows = None

    # -- the step ---------------------------------------------------------------------------------
    @staticmethod
    def transient_nbytes(layout: ArenaLayout, n_heads: int, vocab: int, n: int, max_position: int) -> int:
        """About the most device memory one pass allocates besides the weights and the arenas: per layer the
        gathered K/V [B, L, width], attention's copy of them with every query head [B, heads, L, head_dim]
        twice, the offsets, and the logits [B, vocab] (float32), plus an allowance of 8 hidden-sized
        temporaries per row (a layer's MLP makes a few more, which are small beside the keys). B and L are
        the buckets the pass runs at."""
        b, keys, item = bucket_up(n), key_bucket(max_position + 1), layout.dtype.itemsize
        width = 2 * layout.n_kv_heads * layout.head_dim
        per_key = (width + 2 * n_heads * layout.head_dim) * item + 2 * 8
        return b * keys * per_key + b * vocab * 4 + b * layout.hidden * item * 8

    def step(self, states: Sequence[SeqState], tokens: Sequence[int], streams: Sequence[Any] = ()) -> torch.Tensor:
        """Run `tokens[b]` at `states[b].position` for every b; commit them; return float32 logits [B, vocab]
        (valid until the next step; on CUDA, ordered on the caller's current stream and on `streams`). The
        states are distinct, batchable and share one arena storage; the caller checked their room and
        ownership."""
        n = len(states)
        positions = [s.position for s in states]
        stream = self.stream
        if stream is None:
            logits = self._run(states, tokens, positions)
        else:
            callers = {torch.cuda.current_stream(self.device)}
            callers.update(c for c in streams if c is not None)  # where the sessions' later work runs
            for s in states:  # where compute last used each arena
                last = getattr(s.arena, "compute_stream", None)
                if last is not None:
                    callers.add(last)
            callers.discard(stream)
            for c in callers:
                stream.wait_stream(c)
            with torch.cuda.stream(stream):
                logits = self._run(states, tokens, positions)
            for c in callers:
                c.wait_stream(stream)
        for s, p in zip(states, positions):
            s.mark_written(p + 1)
            s.position = p + 1
            s.unfed_ids = []
        self.steps += 1
        self.sequences += n
        return logits[:n]

    def _run(self, states: Sequence[SeqState], tokens: Sequence[int], positions: list[int]) -> torch.Tensor:
        """The pass itself, on the current stream: views (which order it after a page-in still in
        flight), the inputs, then the graph's replay or the eager body."""
        views = [s.views(refresh=True) for s in states]
        flat, rows = self._segment(views[0].rows)
        storage = self._storage
        bases = []
        for v in views:
            if v.rows.untyped_storage().data_ptr() != storage[0]:  # type: ignore[index]
                raise ValueError("batched decode needs every arena in one storage (the Data segment)")
            base, odd = divmod(v.rows.storage_offset(), self.per_word)
            if odd:
                raise ValueError(f"batched decode needs arenas aligned to {self.word.itemsize} bytes")
            bases.append(base)
        n, size = len(states), bucket_up(len(states))
        self._ensure_inputs(size)
        assert self._inputs is not None and self._staging is not None
        pad = size - n
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the staging buffer
        self._staging[:, :size].copy_(torch.tensor(
            [list(tokens) + [tokens[0]] * pad, positions + [positions[0]] * pad, bases + [bases[0]] * pad]))
        keys = key_bucket(max(positions) + 1)
        self._inputs[:, :size].copy_(self._staging[:, :size], non_blocking=True)
        if self.stream is None:
            return self._body(flat, rows, size, keys)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        if not self.use_graphs:
            return self._body(flat, rows, size, keys)
        entry = self.graphs.get((size, keys))
        graph, logits = entry if entry is not None else self._capture(flat, rows, size, keys)
        graph.replay()
        self.replays += 1
        return logits

    def _segment(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat and the overlapping row views, in words, of the storage `rows` lives in; made once per storage."""
        storage = rows.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key != self._storage:
            words = storage.nbytes() // self.word.itemsize
            width = self.cache.width
            self._flat = torch.empty(0, dtype=self.word, device=self.device).set_(storage, 0, (words,), (1,))
            self._rows = torch.as_strided(self._flat, (words - width + 1, width), (1, 1), 0)
            self.graphs.clear()  # they address the old storage
            self.pool = None
            self._storage = key
        assert self._flat is not None and self._rows is not None
        return self._flat, self._rows

    def _ensure_inputs(self, size: int) -> None:
        if size <= self._cap:
            return
        self._cap = max(size, MIN_INPUT_ROWS)
        size = self._cap
        self._inputs = torch.zeros(3, size, dtype=torch.long, device=self.device)
        self._staging = torch.zeros(3, size, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.graphs.clear()  # they read the old input buffers
        self.pool = None

    def _body(self, flat: torch.Tensor, rows: torch.Tensor, size: int, keys: int) -> torch.Tensor:
        arch, inputs, row = self.arch, self._inputs, self.row_words
        assert inputs is not None and keys <= self._arange.numel()
        ids, pos, base = inputs[0, :size].view(size, 1), inputs[1, :size].view(size, 1), inputs[2, :size].view(size, 1)
        k = self._arange[:keys].view(1, keys)
        read = base + torch.minimum(k, pos) * row  # [B, L]
        write = (base + pos * row + self._arange[: self.cache.width].view(1, -1)).reshape(-1)
        masks = arch.batch_masks(pos, k, self.layout.dtype)
        hidden = arch.embed(ids, pos)
        ctx = arch.context(hidden, pos)
        self.cache.bind(flat, rows, read, write)
        try:
            for i in range(arch.n_layers):
                hidden = arch.run_layer(i, hidden, masks[arch.windows[i]], self.cache, pos, ctx)
        finally:
            self.cache.unbind()
        return arch.lm_head(arch.norm(hidden))[:, 0].float()

    def _capture(self, flat: torch.Tensor, rows: torch.Tensor, size: int, keys: int) -> tuple[Any, torch.Tensor]:
        """Warm up once on the current (the decoder's) stream, then capture; rows rewritten with the same values."""
        self._body(flat, rows, size, keys)
        graph, out = capture_graph(lambda: self._body(flat, rows, size, keys), self.pool, self.stream)
        if self.pool is None:
            self.pool = graph.pool()
        self.captures += 1
        self.graphs[(size, keys)] = (graph, out)
        return graph, out

    def stat(self) -> dict[str, int]:
        """steps: batched passes run; sequences: tokens they made (sequences / steps is the mean batch);
        graphs: captured (batch, keys) shapes held; captures, replays: since the decoder was made."""
        return {"steps": self.steps, "sequences": self.sequences, "graphs": len(self.graphs),
                "captures": self.captures, "replays": self.replays}

    @staticmethod
    def idle_stat() -> dict[str, int]:
        """stat() of a model that has not run a batched step yet."""
        return dict.fromkeys(("steps", "sequences", "graphs", "captures", "replays"), 0)
