"""Built-in model specs: the embedded `demo` model and the `dummy:*` shapes.

Rules: a preset is a config only (no weights, no torch allocation). `demo` has
seeded weights made by `loading.py`; `dummy:*` models get cheap random weights
filled directly on the target device. Sizes of the dummy shapes follow the
published configs (GPT-2 124M, Llama-3.2-1B, Llama-3-8B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from .tokenizer import BOS_ID, EOS_ID, BYTE_VOCAB

__all__ = ["Preset", "PRESETS", "DEMO_SEED", "preset_for"]

# The demo model's weights are torch.manual_seed(DEMO_SEED) + HF's own init, so
# every machine with the same torch version builds the same bytes.
DEMO_SEED = 1234


@dataclass(frozen=True, slots=True)
class Preset:
    """A named built-in model. `seeded` models are initialised by HF on the CPU
    under a fixed seed (small); the others are filled with random values on the device."""

    spec: str
    make_config: Callable[[], PretrainedConfig]
    seeded: bool
    description: str


def _demo_config() -> GPT2Config:
    # Small enough for CPU tests: 4 layers, hidden 256, ~3.5M parameters (14 MB fp32).
    return GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_positions=1024,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=True,
    )


def _gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def _llama_1b_config() -> LlamaConfig:
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, head_dim 64 -> 32 KiB KV/token in bf16.
    # Untied head, as in the measured model (MEASURED.md: 3.0 GB of bf16 weights; tied would be 2.5 GB).
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def _llama_8b_config() -> LlamaConfig:
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128 -> 128 KiB KV/token in bf16.
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


PRESETS: dict[str, Preset] = {
    p.spec: p
    for p in (
        Preset("demo", _demo_config, True, "embedded GPT-2-architecture demo: 4 layers, hidden 256, byte tokenizer"),
        Preset("dummy:gpt2", _gpt2_config, False, "GPT-2 124M shapes, random weights"),
        Preset("dummy:llama-1b", _llama_1b_config, False, "Llama-3.2-1B shapes, random weights"),
        Preset("dummy:llama-8b", _llama_8b_config, False, "Llama-3-8B shapes, random weights"),
    )
}


def preset_for(spec: str) -> Preset | None:
    """The preset named `spec`, or None when `spec` is not a built-in name."""
    return PRESETS.get(spec)
