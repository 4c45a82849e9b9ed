"""The layer-split forward: embed, run layers [first, last], pause or finish, shape the outputs.

Rules:
- Every check happens before the first layer runs (see `validate.py`), so a refused call writes nothing.
- The state changes only at the end of a successful run: a failure mid-run (e.g. out of memory) leaves
  `position`, `paused_at` and `pending` as they were; rows past `position` may hold partial K/V, which is
  harmless because nothing reads a row that is not complete.
- Steering of layer i is applied to layer i's output before anything else sees it (the next layer, the
  pause slot, the returned activation).
- Resume runs from a contiguous copy of the activation slot, so pause/resume is bitwise identical to an
  uninterrupted forward (same ops, same inputs).
- On CUDA the layers of a fresh sequence (position 0, no steering) may come from a prefill plan, a
  captured replay of these same layers (prefill.py); the finish runs here either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..cuda import to_device
from .arch import Arch
from .state import SeqState

if TYPE_CHECKING:
    from .prefill import PrefillGraphs, PrefillPlan

__all__ = ["StepResult", "Outputs", "run_forward", "run_layers", "run_resume"]


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a forward, resume or decode step returns. Tensors are fresh copies on the model's device.

    - `logits`: float32 [vocab] ("last") or [n_tokens, vocab] ("all"); None when paused or not asked.
    - `topk_ids` (int64 [k]) / `topk_logits` (float32 [k]): the last token's top k, for return_logits=k.
    - `activation`: model dtype, [hidden] ("last") or [n_tokens, hidden] ("all"): the output of the pause
      layer when paused, else the output of the last layer before the final norm.
    - `paused_at`: the layer the forward stopped after, or None when it finished.
    - `position`: tokens complete in every layer after this call. `n_tokens`: tokens this call ran.
    """

    logits: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_logits: torch.Tensor | None
    activation: torch.Tensor | None
    paused_at: int | None
    position: int
    n_tokens: int


@dataclass(frozen=True, slots=True)
class Outputs:
    """Validated return modes: logits "last" | "all" | "none" | k (int); activation "none" | "last" | "all"."""

    logits: str | int = "last"
    activation: str = "none"


def run_layers(arch: Arch, state: SeqState, source: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Run layers first..last (inclusive) for the in-flight tokens, from `source`: token ids [1, n] when
    `first` is 0 (embedded here), else layer first-1's output [1, n, hidden]. K/V go to rows [position, +n)."""
    p, n = state.position, source.shape[1]
    position_ids = arch.positions(p, n)
    hidden = arch.embed(source, position_ids, p) if first == 0 else source
    views = state.views()
    masks = arch.masks(p, n, hidden.device, hidden.dtype)
    ctx = arch.context(hidden, position_ids)
    state.cache.bind(views.kv, p, n)
    try:
        for i in range(first, last + 1):
            hidden = arch.run_layer(i, hidden, masks[arch.windows[i]], state.cache, position_ids, ctx)
            hidden = state.apply_steering(i, hidden)
    finally:
        state.cache.unbind()
    return hidden


def _finish(arch: Arch, state: SeqState, hidden: torch.Tensor, pause_at: int | None, out: Outputs) -> StepResult:
    """Either park the activation (pause) or run the head; then commit the state."""
    p, n = state.position, hidden.shape[1]
    act = None
    if out.activation == "last":
        act = hidden[0, -1].clone()
    elif out.activation == "all":
        act = hidden[0].clone()
    if pause_at is not None and pause_at < arch.n_layers:
        state.views().act[p : p + n].copy_(hidden[0])
        state.mark_written(p + n)
        state.paused_at, state.pending = pause_at, n
        return StepResult(None, None, None, act, pause_at, p, n)
    logits = topk_ids = topk_logits = None
    if out.logits != "none":
        normed = arch.norm(hidden)
        if out.logits == "all":
            logits = arch.lm_head(normed)[0].float()
        else:
            last = arch.lm_head(normed[:, -1:])[0, 0].float()
            if out.logits == "last":
                logits = last
            else:
                topk_logits, topk_ids = torch.topk(last, int(out.logits))
    state.mark_written(p + n)
    state.position, state.paused_at, state.pending = p + n, None, 0
    return StepResult(logits, topk_ids, topk_logits, act, None, state.position, n)


def run_forward(arch: Arch, state: SeqState, ids: list[int] | torch.Tensor, pause_at: int | None,
                out: Outputs, prefill: PrefillGraphs | None = None) -> StepResult:
    """A forward over `ids` (already validated, unfed tokens included; a list, or a 1-D int64 tensor)
    from the state's position. `prefill`: the model's prefill plans (CUDA), which a fresh sequence's
    layers may replay instead of running eagerly (prefill.py)."""
    n = len(ids)
    views = state.views(refresh=True)
    if isinstance(ids, torch.Tensor):
        ids_t = ids.reshape(1, n)
    else:  # made on the host for CUDA, which uploads them without waiting (cuda.to_device)
        ids_t = torch.tensor([ids], dtype=torch.long, device="cpu" if state.device.type == "cuda" else state.device)
    last = arch.n_layers - 1 if pause_at is None else pause_at
    plan = _plan(prefill, state, n, 0, last)
    if plan is not None:  # it uploads the ids into its own input
        result = _replayed(plan, arch, state, views.kv, ids_t, pause_at, out)
    else:
        result = _finish(arch, state, run_layers(arch, state, to_device(ids_t, state.device), 0, last), pause_at, out)
    state.unfed_ids = []  # they were the first tokens of `ids`
    return result


def run_resume(
    arch: Arch, state: SeqState, activation: torch.Tensor | None, pause_at: int | None, out: Outputs,
    prefill: PrefillGraphs | None = None,
) -> StepResult:
    """Continue a paused forward from layer paused_at+1 (activation already validated to [pending, hidden])."""
    assert state.paused_at is not None
    p, n, resumed_from = state.position, state.pending, state.paused_at
    views = state.views(refresh=True)
    slot = views.act[p : p + n]
    if activation is not None:
        slot.copy_(activation)
    last = arch.n_layers - 1 if pause_at is None else pause_at
    plan = _plan(prefill, state, n, resumed_from + 1, last) if last > resumed_from else None
    if plan is not None:
        return _replayed(plan, arch, state, views.kv, slot, pause_at, out)
    hidden = slot.clone(memory_format=torch.contiguous_format).unsqueeze(0)
    if last > resumed_from:
        hidden = run_layers(arch, state, hidden, resumed_from + 1, last)
    return _finish(arch, state, hidden, pause_at, out)


def _plan(prefill: PrefillGraphs | None, state: SeqState, n: int, first: int, last: int) -> PrefillPlan | None:
    """The prefill plan for layers first..last of `n` tokens, when the state qualifies: at position 0 (no
    past keys) and without steering."""
    if prefill is None or state.position != 0 or state.has_steering:
        return None
    return prefill.plan(n, first, last)


def _replayed(plan: PrefillPlan, arch: Arch, state: SeqState, kv: torch.Tensor, source: torch.Tensor,
              pause_at: int | None, out: Outputs) -> StepResult:
    """`plan` replayed from `source` (token ids, or the activation to resume from), then finished as the
    eager path finishes; the plan's buffers are free again once the finish has read them."""
    try:
        return _finish(arch, state, plan.run(kv, source), pause_at, out)
    finally:
        plan.release()
