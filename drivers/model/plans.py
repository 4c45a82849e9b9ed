"""Plans: the transient device memory an operation needs, learned once per (model, op, batch, shape bucket).

Rules:
- Cold path: the first request for a key runs the real driver code (the same runner, masks and cache)
  on a meta-device copy of the model, with a dispatch mode that tracks the bytes of every live tensor
  the run creates; the peak is the plan's `peak_nbytes`. Weights and the arena are not counted (the
  kernel knows those). Nothing is allocated on the device.
- Under SDPA the real kernels (flash / memory-efficient) never materialise the [T, T] score matrix, but
  the meta device would run SDPA's math fallback; the meta copy therefore uses an attention function
  that allocates the output only. Under eager attention the scores are real and are counted.
- Warm path: a dict lookup. On CUDA, decode steps also replay captured graphs (see graphs.py); those
  live on each SeqState because they bake in its arena's addresses.
- Buckets are powers of two, and a plan is measured at its bucket's upper bound, so it is an upper bound
  for every shape in the bucket.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import BadArgument

__all__ = ["Plan", "PlanCache", "PeakTracker", "MetaArena", "PLAN_OPS", "bucket_up"]

PLAN_OPS = ("forward", "forward_all", "decode")  # logits for the last token / for every token / one token
CUDA_BLOCK_NBYTES = 512  # the CUDA caching allocator rounds every block up to this
META_SDPA = "djinn_meta_sdpa"


@dataclass(frozen=True, slots=True)
class Plan:
    """What admission control needs for one (op, bucket): `peak_nbytes` of transient device memory
    (beyond weights and the arena) and `arena_nbytes` the sequence occupies afterwards."""

    op: str
    batch: int
    n_tokens: int
    past: int
    peak_nbytes: int
    arena_nbytes: int
    cold_s: float


def bucket_up(n: int) -> int:
    """0 stays 0; otherwise the next power of two >= n."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class MetaArena:
    """An arena on the meta device, for plan runs (same contract as the VMU's Arena)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.used_nbytes = 0
        self.generation = 0
        self.residency = "device"
        self._data = torch.empty(nbytes, dtype=torch.uint8, device="meta")

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self._data[offset : offset + n * dtype.itemsize].view(dtype).view(shape)

    def mark_used(self, end_offset: int) -> None:
        self.used_nbytes = max(self.used_nbytes, end_offset)


class PeakTracker(TorchDispatchMode):
    """Counts bytes of storages created by ops while active; `peak_nbytes` is the high-water mark.

    A storage is live while any tensor the ops returned still references it (tracked with weakref
    finalizers); outputs that alias an input (views, in-place ops) add nothing.
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to = max(1, round_to)
        self.live: dict[int, list[int]] = {}
        self.current_nbytes = 0
        self.peak_nbytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs:
                continue
            entry = self.live.get(key)
            if entry is None:
                nbytes = -(-st.nbytes() // self.round_to) * self.round_to
                self.live[key] = [nbytes, 1]
                self.current_nbytes += nbytes
                self.peak_nbytes = max(self.peak_nbytes, self.current_nbytes)
            else:
                entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current_nbytes -= entry[0]


def _meta_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Output-only attention for plan runs: what a fused SDPA kernel allocates ([B, T, H, Dv])."""
    b, h, t, _ = query.shape
    return query.new_empty((b, t, h, value.shape[-1])), None


def register_meta_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(META_SDPA, _meta_sdpa)
    return META_SDPA


class PlanCache:
    """Plans of one model. `get()` is called on the device worker; `stat()` may be called from any thread."""

    def __init__(self, measure: Callable[[str, int, int], int], bytes_per_token: int, max_positions: int) -> None:
        self._measure = measure
        self._bytes_per_token = bytes_per_token
        self._max_positions = max_positions
        self._plans: dict[tuple[str, int, int, int], Plan] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, op: str, n_tokens: int, past: int, batch: int = 1) -> tuple[str, int, int, int]:
        if op not in PLAN_OPS:
            raise BadArgument(f"plan op must be one of {PLAN_OPS}, got {op!r}")
        if batch != 1:
            raise BadArgument("only batch 1 is planned (one sequence per state)")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise BadArgument(f"n_tokens must be an int >= 1, got {n_tokens!r}")
        if isinstance(past, bool) or not isinstance(past, int) or past < 0:
            raise BadArgument(f"past must be an int >= 0, got {past!r}")
        if op == "decode" and n_tokens != 1:
            raise BadArgument("a decode step runs exactly one token")
        if past + n_tokens > self._max_positions:
            raise BadArgument(
                f"past + n_tokens = {past + n_tokens} exceeds the model's {self._max_positions} positions"
            )
        return op, batch, bucket_up(n_tokens), bucket_up(past)

    def get(self, op: str, n_tokens: int, past: int = 0, batch: int = 1) -> Plan:
        key = self.key(op, n_tokens, past, batch)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self.hits += 1
                return plan
        _, _, n_b, past_b = key
        t0 = time.perf_counter()
        with collector_paused():
            peak = self._measure(op, n_b, past_b)
        plan = Plan(op, batch, n_b, past_b, peak, (past_b + n_b) * self._bytes_per_token, time.perf_counter() - t0)
        with self._lock:
            self.misses += 1
            self._plans.setdefault(key, plan)
        return plan

    def stat(self) -> dict[str, int]:
        with self._lock:
            return {"plans": len(self._plans), "hits": self.hits, "misses": self.misses}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this block (then as before). A plan run builds a meta model under
    `torch.device("meta")` and runs it under a dispatch mode, and allocates enough Python objects to set
    the collector off: the finalizers of unrelated garbage it would run there (other sessions' tensors,
    CUDA graphs) would see this thread's modes, and what they made would be on the meta device or
    counted in the plan. One GPU test run aborted in exactly that spot."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def measure_on_meta(meta_arch: Any, layout: Any, fingerprint: str, op: str, n_tokens: int, past: int,
                    round_to: int) -> int:
    """Peak transient bytes of one run of `op` over `n_tokens` after `past` tokens, on the meta copy."""
    from .runner import Outputs, run_forward
    from .state import SeqState

    meta = torch.device("meta")
    arena = MetaArena(layout.arena_nbytes(past + n_tokens))
    state = SeqState(object(), fingerprint, layout, arena, past + n_tokens, meta)
    state.position = past
    out = Outputs("all" if op == "forward_all" else "last", "none")
    with torch.inference_mode(), PeakTracker(round_to) as tracker:
        result = run_forward(meta_arch, state, [0] * n_tokens, None, out)
        del result
    return tracker.peak_nbytes
