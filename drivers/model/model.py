"""LoadedModel: one model on one device, and the calls the kernel makes on it.

Rules:
- Plain synchronous code, called only on the device worker thread (never on the event loop); `stat()`
  is the one call safe from another thread.
- Every call checks all of its arguments before running a layer (BadArgument / Busy / NotFound), so a
  refused call leaves the state usable and unchanged.
- A state belongs to the model that made it. While paused it accepts only `resume` (or
  `state.discard_pending()`); while a `generate` iterator is open it accepts nothing else.
- Weights live in one Text range (`text_nbytes`); `unload()` frees it, after which every call raises
  NotFound. Refcounting models across sessions is the kernel registry's job.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import BadArgument, Busy, NotFound
from .arch import make_arch
from .batch import BatchDecoder
from .cache import ArenaLayout
from .graphs import StaticDecoder
from .plans import CUDA_BLOCK_NBYTES, Plan, PlanCache, measure_on_meta
from .prefill import PrefillGraphs
from .runner import Outputs, StepResult, run_forward, run_resume
from .sampling import make_generator, sample
from .state import SeqState
from .tokenizer import Tokenizer
from .validate import check_activation, check_ids, check_outputs, check_pause, check_sampling
from .weights import TextRange

__all__ = ["LoadedModel", "Generation", "DECODE_MODES"]

# "dynamic": every step through the eager layer loop; "static": static-shape steps run eagerly (any
# device; used to test the graph path's math on CPU); "graph": static steps captured as CUDA graphs.
DECODE_MODES = ("dynamic", "static", "graph")


class Generation(Iterator[int]):
    """The iterator `generate()` returns: the prefill on the first `next()`, then one decode step per id.

    The state is reserved for it (other calls raise Busy) until it is exhausted, raises, or is closed
    (`close()`: the kernel's cancel); dropping it also releases the state. Between ids it may instead be
    stepped together with other sessions' generations by `LoadedModel.decode_batch` (when `batchable`)."""

    def __init__(self, model: "LoadedModel", state: SeqState, ids: list[int] | torch.Tensor, n: int, temp: float,
                 top_p: float, gen: torch.Generator | None, stops: frozenset[int]) -> None:
        self._model, self._state, self._ids = model, state, ids
        self._n, self._temp, self._top_p, self._gen, self._stops = n, temp, top_p, gen, stops
        self._made = 0  # ids yielded so far
        self._last = -1  # the last id yielded: the next step's input
        self._finished = False  # the last id was a stop id or the n-th
        self._open = True
        state.generating = True

    @property
    def state(self) -> SeqState:
        return self._state

    @property
    def batchable(self) -> bool:
        """Whether the next id comes from a decode step that may run in a batch (see batch.py)."""
        return self._open and self._made > 0 and not self._finished and BatchDecoder.batchable(self._state)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        if not self._open:
            raise StopIteration
        try:
            if self._finished:
                raise StopIteration
            model, state = self._model, self._state
            if self._made == 0:
                logits = model._prefill(state, self._ids)
                self._ids = []
            else:
                self._check_step()
                logits = model._decode_one(state, self._last)
            return self._take(logits)
        except BaseException:
            self._release()
            raise

    def _check_step(self) -> None:
        self._model._alive()
        if self._state.unfed_ids != [self._last] or self._state.paused_at is not None:
            raise Busy("the state changed under a running generate(); cancel it before other calls")

    def _take(self, logits: torch.Tensor) -> int:
        """The next id from this step's logits [vocab]; it stays unfed, to run first in the next step."""
        tok = sample(logits, self._temp, self._top_p, self._gen)
        self._state.unfed_ids = [tok]
        self._made += 1
        self._last = tok
        self._finished = tok in self._stops or self._made == self._n
        return tok

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._state.generating = False

    def __del__(self) -> None:
        self._release()


class LoadedModel:
    """Made by `load_model()`. Attributes are read-only facts; methods are the driver's model calls."""

    def __init__(
        self, *, spec: str, name: str, hf: nn.Module, tokenizer: Tokenizer | None, device: torch.device,
        dtype: torch.dtype, text: TextRange, meta_factory: Any,
    ) -> None:
        self.spec, self.name, self.device, self.dtype, self.tokenizer = spec, name, device, dtype, tokenizer
        self.arch = make_arch(hf)
        a = self.arch
        self.model_type = a.model_type
        self.n_layers, self.hidden_size, self.vocab_size = a.n_layers, a.hidden, a.vocab_size
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.max_positions = a.max_positions
        self.attn_implementation = a.attn_implementation
        self.n_params = sum(p.numel() for p in hf.parameters())
        self.layout = ArenaLayout(a.n_layers, a.n_kv_heads, a.head_dim, a.hidden, dtype)
        self.bytes_per_token = self.layout.bytes_per_token
        self.text_nbytes = text.nbytes
        self.fingerprint = (
            f"{spec}|{a.model_type}|{str(dtype).removeprefix('torch.')}|L{a.n_layers}|H{a.hidden}"
            f"|kv{a.n_kv_heads}x{a.head_dim}|V{a.vocab_size}"
        )
        self._decode_mode = "graph" if device.type == "cuda" else "dynamic"
        self._text: TextRange | None = text
        self._meta_factory = meta_factory
        self._meta_arch: Any = None
        self._batcher: BatchDecoder | None = None  # made at the first batched decode step
        self._prefills = PrefillGraphs(self.arch, self.layout, device) if device.type == "cuda" else None
        round_to = CUDA_BLOCK_NBYTES if device.type == "cuda" else 1
        self._plans = PlanCache(
            lambda op, n, past: measure_on_meta(self._meta(), self.layout, self.fingerprint, op, n, past, round_to),
            self.bytes_per_token,
            self.max_positions,
        )

    # -- facts ------------------------------------------------------------------------------------
    def arena_nbytes(self, max_tokens: int) -> int:
        """Bytes an arena needs to hold `max_tokens` tokens (KV of every layer + one activation slot each)."""
        self._check_max_tokens(max_tokens)
        return self.layout.arena_nbytes(max_tokens)

    def stat(self) -> dict[str, Any]:
        return {
            "name": self.name, "spec": self.spec, "model_type": self.model_type,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "params": self.n_params, "text_nbytes": self.text_nbytes, "n_layers": self.n_layers,
            "bytes_per_token": self.bytes_per_token, "loaded": self._text is not None,
            "plans": self._plans.stat(),
            "batched_decode": self.batch_stat(),
            "prefill_graphs": self.prefill_stat(),
        }

    def prefill_stat(self) -> dict[str, int]:
        """The prefill plan figures (PrefillGraphs.stat); zeros where there are none (CPU)."""
        return self._prefills.stat() if self._prefills is not None else PrefillGraphs.idle_stat()

    def batch_stat(self) -> dict[str, int]:
        """The batched decode figures (BatchDecoder.stat); zeros before the first batched step."""
        batcher = self._batcher
        return batcher.stat() if batcher is not None else BatchDecoder.idle_stat()

    def __repr__(self) -> str:
        return f"LoadedModel({self.spec!r}, {self.model_type}, {self.n_params} params, {self.dtype}, {self.device})"

    @property
    def decode_mode(self) -> str:
        """How single-token steps run (DECODE_MODES); "graph" by default on CUDA, "dynamic" on the CPU."""
        return self._decode_mode

    @decode_mode.setter
    def decode_mode(self, mode: str) -> None:
        if mode not in DECODE_MODES:
            raise BadArgument(f"decode_mode must be one of {DECODE_MODES}, got {mode!r}")
        if mode == "graph" and self.device.type != "cuda":
            raise BadArgument("decode_mode 'graph' needs a CUDA device")
        self._decode_mode = mode

    # -- states -----------------------------------------------------------------------------------
    def new_state(self, arena: Any, max_tokens: int) -> SeqState:
        """A fresh sequence whose KV cache and activation slots are views into `arena`."""
        self._alive()
        self._check_max_tokens(max_tokens)
        need = self.layout.arena_nbytes(max_tokens)
        if int(arena.nbytes) < need:
            raise BadArgument(f"arena has {arena.nbytes} bytes; {max_tokens} tokens need {need} (arena_nbytes())")
        return SeqState(self, self.fingerprint, self.layout, arena, max_tokens, self.device)

    # -- forward / resume -------------------------------------------------------------------------
    def forward(
        self, state: SeqState, input_ids: Any, *, pause_at: int | None = None,
        return_logits: str | int = "last", return_activation: str = "none",
    ) -> StepResult:
        """Run `input_ids` ([T] / [1, T] ints) after the state's tokens; stop after layer `pause_at` if given."""
        self._check_state(state)
        ids = check_ids(input_ids, self.vocab_size)
        out = check_outputs(return_logits, return_activation, self.vocab_size)
        pause = check_pause(pause_at, self.n_layers)
        all_ids = _after_unfed(state, ids)
        self._check_room(state, len(all_ids))
        with torch.inference_mode():
            if len(all_ids) == 1 and pause is None and out.activation == "none" and self.decode_mode != "dynamic":
                return self._static_step(state, int(all_ids[0]), out)
            return run_forward(self.arch, state, all_ids, pause, out, self._prefill_plans())

    def resume(
        self, state: SeqState, activation: torch.Tensor | None = None, *, pause_at: int | None = None,
        return_logits: str | int = "last", return_activation: str = "none",
    ) -> StepResult:
        """Continue a paused forward from layer paused_at+1, with the stored or a replacement activation
        ([pending, hidden], model dtype). May pause again at a later layer."""
        self._check_state(state, paused_ok=True)
        if state.paused_at is None:
            raise Busy("state is not paused; nothing to resume")
        act = check_activation(activation, state.pending, self.hidden_size, self.dtype, self.device)
        pause = check_pause(pause_at, self.n_layers, after=state.paused_at)
        out = check_outputs(return_logits, return_activation, self.vocab_size)
        with torch.inference_mode():
            return run_resume(self.arch, state, act, pause, out, self._prefill_plans())

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self, state: SeqState, input_ids: Any, max_new_tokens: int, *, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, stop_ids: Any = (),
    ) -> Iterator[int]:
        """Prefill `input_ids`, then yield up to `max_new_tokens` ids, one decode step per id.

        All checks run now, before the iterator is returned. The last id yielded (a stop id is yielded,
        then generation ends) stays in `state.unfed_ids` and runs first in the next forward. Closing the
        iterator early (cancel) leaves the state consistent the same way.
        """
        self._check_state(state)
        ids = check_ids(input_ids, self.vocab_size)
        temp, top_p, seed, n, stops = check_sampling(temperature, top_p, seed, max_new_tokens, stop_ids,
                                                     self.vocab_size)
        # Rows used: the prefill, then n-1 decode steps; the last token yielded stays unfed.
        self._check_room(state, len(state.unfed_ids) + len(ids) + n - 1)
        gen = make_generator(self.device, seed) if temp > 0.0 else None
        return Generation(self, state, _after_unfed(state, ids), n, temp, top_p, gen, stops)

    def decode_batch(self, gens: Sequence[Generation], streams: Sequence[Any] = ()) -> list[int | Exception]:
        """One decode step for each of `gens` (generations of distinct states of this model, each
        `batchable`) in one batched pass over the weights; returns, in order, each one's next id, or the
        exception its sampling raised (that generation is then closed, as a failed `next()` leaves it).

        Checks everything first (BadArgument, Busy, NotFound). If the pass itself raises, nothing is
        committed and every generation stays open, so the caller may step them one by one instead.
        CUDA: `streams` are the streams the sessions' later work runs on; they are ordered after the pass."""
        self._alive()
        states = [g.state for g in gens]
        if not gens or len({id(s) for s in states}) != len(states):
            raise BadArgument("decode_batch needs one or more generations of distinct states")
        for g in gens:
            if not isinstance(g, Generation) or g._model is not self:
                raise BadArgument("decode_batch: a generation of another model (generate())")
            if not g.batchable:
                raise Busy("decode_batch: a generation is not between decode steps, or its state is paused, "
                           "steered or paged out")
            g._check_step()
        batcher = self._batch_decoder()
        with torch.inference_mode():
            logits = batcher.step(states, [g._last for g in gens], streams)
            out: list[int | Exception] = []
            for g, row in zip(gens, logits, strict=True):
                try:
                    out.append(g._take(row))
                except Exception as exc:  # noqa: BLE001 - this generation's own failure, after the commit
                    g.close()
                    out.append(exc)
            return out

    def _prefill_plans(self) -> PrefillGraphs | None:
        """The prefill plans a forward over a fresh sequence may replay: on CUDA with graphs on (decode_mode
        "graph", the default there); None runs every prefill eagerly."""
        return self._prefills if self._decode_mode == "graph" else None

    def _batch_decoder(self) -> BatchDecoder:
        """The model's one BatchDecoder, made at first use, remade when the decode mode changed."""
        batcher = self._batcher
        graphs = self.decode_mode == "graph"
        if batcher is None or batcher.use_graphs != graphs:
            if batcher is not None:
                batcher.close()
            batcher = self._batcher = BatchDecoder(self.arch, self.layout, self.device, graphs)
        return batcher

    def batch_nbytes(self, n: int, max_position: int) -> int:
        """About the most transient device memory a batched pass of `n` sequences allocates when the
        longest is at `max_position` (see BatchDecoder.transient_nbytes)."""
        return BatchDecoder.transient_nbytes(self.layout, self.n_heads, self.vocab_size, n, max_position)

    def _prefill(self, state: SeqState, ids: list[int] | torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = run_forward(self.arch, state, ids, None, Outputs(), self._prefill_plans()).logits
        assert logits is not None
        return logits

    def _decode_one(self, state: SeqState, token: int) -> torch.Tensor:
        with torch.inference_mode():
            if self.decode_mode != "dynamic":
                logits = self._static_step(state, token, Outputs()).logits
            else:
                logits = run_forward(self.arch, state, [token], None, Outputs()).logits
        assert logits is not None
        return logits

    def _static_step(self, state: SeqState, token: int, out: Outputs) -> StepResult:
        graphs = self.decode_mode == "graph"
        shared = self._batch_decoder() if graphs and BatchDecoder.batchable(state) else None
        if shared is not None and shared.addresses(state):
            # A pass of one through the model's shared batch graphs: they address arenas by offset in one
            # storage, so every state replays the same few graphs, where a StaticDecoder would capture
            # graphs of its own for each new state, key bucket and arena generation (a capture costs
            # several steps). Steered states, and arenas outside that storage, keep their StaticDecoder.
            with torch.inference_mode():
                logits = shared.step([state], [token])[0].clone()
            return _step_result(logits, out, state.position)
        if state.static is not None and state.static.use_graphs != graphs:
            state.static.close()
            state.static = None
        if state.static is None:
            state.static = StaticDecoder(self.arch, self.device, state.max_tokens, graphs)
        return _step_result(state.static.step(state, token), out, state.position)

    # -- plans ------------------------------------------------------------------------------------
    def plan(self, op: str, n_tokens: int, past: int = 0, batch: int = 1) -> Plan:
        """The memory plan for `op` ("forward", "forward_all", "decode") over `n_tokens` after `past`
        tokens; measured on the meta device the first time a bucket is asked for, cached after."""
        self._alive()
        return self._plans.get(op, n_tokens, past, batch)

    def _meta(self) -> Any:
        if self._meta_arch is None:
            self._meta_arch = make_arch(self._meta_factory())
        return self._meta_arch

    # -- lifetime ---------------------------------------------------------------------------------
    def unload(self) -> None:
        """Free the Text range. Idempotent. States of this model become unusable (NotFound)."""
        if self._text is None:
            return
        text, self._text = self._text, None
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self._prefills is not None:
            self._prefills.close()
        self.arch = None  # type: ignore[assignment]
        self._meta_arch = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no kernel may still read the range once it is reused
        text.free()

    # -- checks -----------------------------------------------------------------------------------
    def _alive(self) -> None:
        if self._text is None:
            raise NotFound(f"model {self.name!r} was unloaded")

    def _check_max_tokens(self, max_tokens: Any) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadArgument(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if max_tokens > self.max_positions:
            raise BadArgument(f"max_tokens {max_tokens} exceeds the model's {self.max_positions} positions")

    def _check_state(self, state: Any, *, paused_ok: bool = False) -> None:
        self._alive()
        if not isinstance(state, SeqState) or state.owner is not self:
            raise BadArgument("state was not made by this model (new_state())")
        if state.generating:
            raise Busy("a generate() is running on this state; close the iterator first")
        if state.paused_at is not None and not paused_ok:
            raise Busy(f"state is paused after layer {state.paused_at}; resume it or discard_pending() first")

    def _check_room(self, state: SeqState, n_new: int) -> None:
        if state.position + n_new > state.max_tokens:
            raise BadArgument(
                f"{n_new} more tokens after {state.position} would pass max_tokens={state.max_tokens}"
            )


def _after_unfed(state: SeqState, ids: list[int] | torch.Tensor) -> list[int] | torch.Tensor:
    """What a forward runs: the state's unfed tokens (rare: the last token a generate yielded), then `ids`."""
    if not state.unfed_ids:
        return ids
    return state.unfed_ids + (ids.tolist() if isinstance(ids, torch.Tensor) else ids)


def _step_result(logits: torch.Tensor, out: Outputs, position: int) -> StepResult:
    """A one-token step's result from its float32 logits [vocab], shaped as `out` asks."""
    topk_ids = topk_logits = None
    if isinstance(out.logits, int):
        topk_logits, topk_ids = torch.topk(logits, out.logits)
        logits = None
    elif out.logits == "all":
        logits = logits.unsqueeze(0)
    elif out.logits == "none":
        logits = None
    return StepResult(logits, topk_ids, topk_logits, None, None, position, 1)
