"""Choosing the next token from logits: greedy, or temperature + top-p with a seeded generator.

Rules: pure functions of (logits, settings, generator); no state. Greedy is `argmax` (ties: lowest id,
as torch and HF do). Top-p keeps the smallest set of most likely tokens whose probability reaches
`top_p`, always at least one, the same rule as HF's TopPLogitsWarper.
"""

from __future__ import annotations

import torch

__all__ = ["sample", "make_generator"]


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded with `seed`, or from fresh entropy when seed is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token id for 1-D float `logits`. temperature 0 means greedy."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p)
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
