"""Argument checks for the model driver's calls. Each returns the normalised value or raises BadArgument.

Rules: every check runs before any layer does, so a refused call leaves the state and the arena as they
were. Messages say what was wrong and what is allowed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..cuda import to_device
from ..errors import BadArgument
from .runner import Outputs

__all__ = ["check_ids", "check_outputs", "check_pause", "check_activation", "check_sampling"]

_LOGIT_MODES = ("last", "all", "none")
_ACT_MODES = ("none", "last", "all")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_ids(input_ids: Any, vocab_size: int, *, allow_empty: bool = False) -> list[int] | torch.Tensor:
    """Token ids: a sequence of ints, or an integer tensor of shape [T] or [1, T].

    A sequence comes back as a list of ints, a tensor as a 1-D int64 tensor on its own device: a
    prompt that arrived as a tensor is checked as a tensor and is not turned into Python ints and
    back, a per-token cost in Python."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise BadArgument(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise BadArgument(f"input_ids must have shape [T] or [1, T], got {list(input_ids.shape)}")
        ids_t = input_ids.to(torch.long)
        if not ids_t.numel():
            if not allow_empty:
                raise BadArgument("input_ids is empty; give at least one token")
            return ids_t
        if ids_t.is_cpu:  # numpy's min and max of a host array cost less than a torch op
            arr = ids_t.numpy()
            lo, hi = int(arr.min()), int(arr.max())
        else:
            lo, hi = (int(v) for v in torch.aminmax(ids_t))
        if lo < 0 or hi >= vocab_size:
            bad = [t for t in ids_t.tolist() if not 0 <= t < vocab_size]
            raise BadArgument(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        return ids_t
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        if not all(_is_int(t) for t in input_ids):
            raise BadArgument("input_ids must be integers")
        ids = list(input_ids)
    else:
        raise BadArgument(f"input_ids must be a list of ints or a LongTensor, got {type(input_ids).__name__}")
    if not ids and not allow_empty:
        raise BadArgument("input_ids is empty; give at least one token")
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # min/max run in C: the list is the whole prompt
        bad = [t for t in ids if not 0 <= t < vocab_size]
        raise BadArgument(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


def check_outputs(return_logits: Any, return_activation: Any, vocab_size: int) -> Outputs:
    if _is_int(return_logits):
        if not 1 <= return_logits <= vocab_size:
            raise BadArgument(f"return_logits=k needs 1 <= k <= {vocab_size}, got {return_logits}")
    elif return_logits not in _LOGIT_MODES:
        raise BadArgument(f"return_logits must be one of {_LOGIT_MODES} or an int k, got {return_logits!r}")
    if return_activation not in _ACT_MODES:
        raise BadArgument(f"return_activation must be one of {_ACT_MODES}, got {return_activation!r}")
    return Outputs(return_logits, return_activation)


def check_pause(pause_at: Any, n_layers: int, after: int = -1) -> int | None:
    """None, or a layer index in (after, n_layers - 1]."""
    if pause_at is None:
        return None
    if not _is_int(pause_at) or not after < pause_at < n_layers:
        raise BadArgument(f"pause_at must be a layer index in [{after + 1}, {n_layers - 1}], got {pause_at!r}")
    return pause_at


def check_activation(
    activation: Any, pending: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A replacement activation as [pending, hidden] on the model's device. Its dtype must be the model's."""
    if activation is None:
        return None
    if not isinstance(activation, torch.Tensor):
        raise BadArgument(f"activation must be a tensor, got {type(activation).__name__}")
    if activation.dtype != dtype:
        raise BadArgument(f"activation dtype must be {dtype}, got {activation.dtype}")
    shape = list(activation.shape)
    if shape == [1, pending, hidden]:
        activation = activation[0]
    elif shape == [hidden] and pending == 1:
        activation = activation.unsqueeze(0)
    elif shape != [pending, hidden]:
        raise BadArgument(f"activation shape must be [{pending}, {hidden}] (or [1, {pending}, {hidden}]), got {shape}")
    return to_device(activation, device)  # off the wire: staged, not a wait for the device


def check_sampling(temperature: Any, top_p: Any, seed: Any, max_new_tokens: Any, stop_ids: Any, vocab_size: int
                   ) -> tuple[float, float, int | None, int, frozenset[int]]:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise BadArgument(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise BadArgument("temperature and top_p must be numbers") from None
    if not temperature >= 0.0 or temperature == float("inf"):
        raise BadArgument(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadArgument(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not _is_int(seed):
        raise BadArgument(f"seed must be an int or None, got {seed!r}")
    stops = check_ids(list(stop_ids), vocab_size, allow_empty=True) if not isinstance(stop_ids, int) else \
        check_ids([stop_ids], vocab_size)
    return temperature, top_p, seed, max_new_tokens, frozenset(stops)
