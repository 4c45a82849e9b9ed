"""drivers/model: loading HF models, the layer-split forward, KV caches in session arenas, plans.

The kernel calls `load_model()` once per model, `model.new_state(arena, max_tokens)` per session, then
`forward` / `resume` / `generate` / `plan` on the device worker thread. See docs/INTERNALS.md.
"""

from .cache import ArenaCache, ArenaLayout, ArenaViews
from .graphs import StaticDecoder
from .loading import ATTN_IMPLEMENTATIONS, load_model, resolve_device, resolve_dtype
from .model import DECODE_MODES, Generation, LoadedModel
from .plans import PLAN_OPS, Plan
from .presets import PRESETS
from .runner import StepResult
from .sampling import sample
from .state import STEERING_OPS, SeqState, Steer
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from .weights import TextAllocator, TextRange

__all__ = [
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "LoadedModel",
    "Generation",
    "SeqState",
    "Steer",
    "StepResult",
    "Plan",
    "ArenaLayout",
    "ArenaViews",
    "ArenaCache",
    "StaticDecoder",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TextAllocator",
    "TextRange",
    "sample",
    "PRESETS",
    "PLAN_OPS",
    "STEERING_OPS",
    "DECODE_MODES",
    "ATTN_IMPLEMENTATIONS",
]
