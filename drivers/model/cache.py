"""The KV cache in a session arena: token-major layout, views, and the transformers Cache that writes into them.

Rules:
- One row per token: `[n_layers, 2 (K, V), n_kv_heads, head_dim]` then `[hidden]` (the paused-activation
  slot), all in the model dtype. Row t lives at byte offset `t * bytes_per_token`, so the bytes in use are
  always a prefix of the arena: the high-water mark is `tokens_written * bytes_per_token`, and page-out,
  snapshot and fork copy only that prefix.
- Views are taken from `arena.view(...)` and are only valid for the arena generation they were taken at
  (`ArenaViews.generation`); `SeqState.views()` re-takes them when the VMU moved the arena.
- `ArenaCache.update()` is called by the HF attention modules. It writes the new K/V rows and returns
  views of the whole prefix as `[1, n_kv_heads, T, head_dim]` (strided views, no copy). Which rows it
  writes is set by the runner with `bind()` (dynamic shapes) or `bind_static()` (a device-tensor position,
  full-length views: the CUDA-graph decode path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["ArenaLayout", "ArenaViews", "ArenaCache"]


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Sizes of one token's row. Pure arithmetic; no tensors."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    dtype: torch.dtype

    @property
    def kv_elems(self) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim

    @property
    def row_elems(self) -> int:
        return self.kv_elems + self.hidden

    @property
    def bytes_per_token(self) -> int:
        return self.row_elems * self.dtype.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_elems * self.dtype.itemsize

    def arena_nbytes(self, max_tokens: int) -> int:
        return max_tokens * self.bytes_per_token

    def take_views(self, arena: Any, max_tokens: int) -> "ArenaViews":
        rows = arena.view(self.dtype, (max_tokens, self.row_elems), 0)
        kv = rows[:, : self.kv_elems].unflatten(1, (self.n_layers, 2, self.n_kv_heads, self.head_dim))
        act = rows[:, self.kv_elems :]
        return ArenaViews(int(arena.generation), rows, kv, act)


@dataclass(frozen=True, slots=True)
class ArenaViews:
    """Typed views of one arena at one generation: `rows` [max_tokens, row_elems],
    `kv` [max_tokens, n_layers, 2, n_kv_heads, head_dim], `act` [max_tokens, hidden]."""

    generation: int
    rows: torch.Tensor
    kv: torch.Tensor
    act: torch.Tensor


class _ArenaLayer(CacheLayerMixin):
    """Per-layer face of ArenaCache for code that asks the Cache about one layer (masks, lengths)."""

    is_sliding = False

    def __init__(self, cache: "ArenaCache", layer_idx: int) -> None:
        super().__init__()
        self._cache = cache
        self._layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self._cache.update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.start + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.start

    def get_max_length(self) -> int:
        return -1 if self._cache.kv is None else int(self._cache.kv.shape[0])

    def reset(self) -> None:  # the arena is the session's; never zeroed behind the kernel's back
        pass


class ArenaCache(Cache):
    """A transformers Cache whose storage is the session arena (see the module rules).

    Owned by one SeqState and used only on the device worker thread, one forward at a time.
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__(layers=[_ArenaLayer(self, i) for i in range(n_layers)])
        self.kv: torch.Tensor | None = None
        self.start = 0
        self.n_new = 0
        self._static_pos: torch.Tensor | None = None
        self._static_len = 0
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows_of: torch.Tensor | None = None

    def bind(self, kv: torch.Tensor, start: int, n_new: int) -> None:
        """Next updates write rows [start, start + n_new) and return the prefix [0, start + n_new)."""
        self._set_kv(kv)
        self.start, self.n_new = start, n_new
        self._static_pos = None

    def _set_kv(self, kv: torch.Tensor) -> None:
        # Per-layer K/V row views are taken once per arena view, not once per layer call:
        # on a launch-bound GPU each view op is CPU time the forward waits for.
        # All 2 * n_layers of them from one unbind of a [n_layers * 2, max_tokens, H, D] view.
        if kv is not self.kv and kv is not self._rows_of:
            rows = kv.permute(1, 2, 0, 3, 4).flatten(0, 1).unbind(0)
            self._rows = list(zip(rows[0::2], rows[1::2]))
            self._rows_of = kv
        self.kv = kv

    def bind_static(self, kv: torch.Tensor, pos: torch.Tensor, kv_len: int) -> None:
        """Next updates write one row at device position `pos` ([1] long) and return the first `kv_len` rows.
        No host value is read, so the step can be captured in a CUDA graph."""
        self._set_kv(kv)
        self._static_pos, self._static_len = pos, kv_len

    def unbind(self) -> None:
        self.kv, self._static_pos = None, None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv
        if kv is None:
            raise RuntimeError("ArenaCache used outside a bound forward (driver bug)")
        k_rows, v_rows = self._rows[layer_idx]  # [max_tokens, H, D] each
        k_new, v_new = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [T, H, D]
        if self._static_pos is not None:
            k_rows.index_copy_(0, self._static_pos, k_new)
            v_rows.index_copy_(0, self._static_pos, v_new)
            end = self._static_len
        else:
            end = self.start + self.n_new
            k_rows[self.start : end].copy_(k_new)
            v_rows[self.start : end].copy_(v_new)
            if self.start == 0:
                # No past keys: attend over the fresh, contiguous K/V (the same values the arena
                # now holds); the fused attention kernels run faster on them than on strided rows.
                return key_states, value_states
        return k_rows[:end].permute(1, 0, 2).unsqueeze(0), v_rows[:end].permute(1, 0, 2).unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.start + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False
