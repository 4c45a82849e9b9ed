"""Architecture adapters: how to embed, run one layer, and finish, for each supported HF family.

Rules: the runner never calls an HF model's top-level forward; it calls the
pieces named here, layer by layer, so that a forward can stop after any layer.
Two families: GPT-2 (learned positions) and Llama-like (RoPE; Llama, Mistral,
Qwen2, Qwen3 share the module layout). Masks are built here from plain
positions: our own code, not `create_causal_mask`, so the static (CUDA-graph)
path and the dynamic path share one definition, including sliding windows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BadArgument

__all__ = ["Arch", "make_arch", "SUPPORTED_MODEL_TYPES"]

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_LIKE)


class Arch:
    """The pieces of one loaded HF causal LM. Shapes: hidden states are [1, T, hidden]."""

    def __init__(self, hf: nn.Module) -> None:
        cfg = hf.config
        self.hf = hf
        self.config = cfg
        self.model_type: str = cfg.model_type
        self.attn_implementation: str = cfg._attn_implementation
        self.n_layers: int = cfg.num_hidden_layers
        self.hidden: int = cfg.hidden_size
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.vocab_size: int = cfg.vocab_size
        self.max_positions: int = cfg.max_position_embeddings
        self.windows: list[int | None] = self._windows(cfg)
        self.lm_head: nn.Module = hf.lm_head
        # Every position id the model takes, made once on its device: a forward's position ids are a slice
        # of it, where a fresh arange would be a kernel launch per forward and resume.
        device = next(hf.parameters()).device
        self._positions = torch.arange(self.max_positions, device=device)
        if device.type == "cuda":  # made on this stream; compute on any other stream reads it
            torch.cuda.current_stream(device).synchronize()

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Position ids [1, n] for positions start .. start+n-1 (a view; never written to). Past the
        model's positions (only the plans' meta-device runs of rounded-up shapes go there) a fresh arange."""
        table = self._positions
        if start + n <= table.shape[0]:
            return table[start : start + n].unsqueeze(0)
        return torch.arange(start, start + n, device=table.device).unsqueeze(0)

    @staticmethod
    def _windows(cfg: Any) -> list[int | None]:
        n = cfg.num_hidden_layers
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            return [window if t == "sliding_attention" else None for t in layer_types]
        if cfg.model_type == "mistral" and window:
            return [window] * n
        return [None] * n

    # -- per-family pieces (overridden) ---------------------------------------------------------
    layers: nn.ModuleList

    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Input embeddings of `ids` [B, T] at `position_ids`; `start` (an int) when those are start ..
        start+T-1, so a family with a learned position table may read it as a slice instead of a gather."""
        raise NotImplementedError

    def context(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """Per-forward values every layer needs (RoPE tables); computed once per forward or resume."""
        return {}

    def run_layer(
        self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None, cache: Any, position_ids: torch.Tensor,
        ctx: dict[str, Any],
    ) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- masks ------------------------------------------------------------------------------------
    def masks(self, past: int, n_new: int, device: torch.device, dtype: torch.dtype) -> dict[int | None, Any]:
        """Masks for queries at positions [past, past+n_new) over keys [0, past+n_new), by window.

        None means "no mask needed": SDPA then applies `is_causal` when n_new > 1, which is only
        right without past keys, and nothing for one query, which attends to every key.
        """
        total = past + n_new
        out: dict[int | None, Any] = {}
        for w in set(self.windows):
            limited = w is not None and total > w
            if not limited and (n_new == 1 or (past == 0 and self.attn_implementation == "sdpa")):
                out[w] = None
                continue
            q = torch.arange(past, total, device=device).view(-1, 1)
            k = torch.arange(total, device=device).view(1, -1)
            keep = k <= q
            if w is not None:
                keep = keep & (k > q - w)
            out[w] = self._finish_mask(keep.view(1, 1, n_new, total), dtype)
        return out

    def static_masks(self, pos: torch.Tensor, kv_len: int, arange: torch.Tensor, dtype: torch.dtype) -> dict:
        """Masks for one query at device position `pos` ([1] long) over `kv_len` keys; no host reads."""
        return self.batch_masks(pos.view(1, 1), arange[:kv_len].view(1, kv_len), dtype)

    def batch_masks(self, pos: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> dict:
        """Masks [B, 1, 1, L] for one query per row at device positions `pos` ([B, 1] long) over the key
        positions `keys` ([1, L]); no host reads."""
        out: dict[int | None, Any] = {}
        b, n = pos.shape[0], keys.shape[1]
        for w in set(self.windows):
            keep = keys <= pos
            if w is not None:
                keep = keep & (keys > pos - w)
            out[w] = self._finish_mask(keep.view(b, 1, 1, n), dtype)
        return out

    def _finish_mask(self, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.attn_implementation == "sdpa":
            return keep
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        return torch.where(keep, zero, torch.finfo(dtype).min)


class GPT2Arch(Arch):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__(hf)
        tr = hf.transformer
        self.wte, self.wpe, self.drop, self.layers, self.ln_f = tr.wte, tr.wpe, tr.drop, tr.h, tr.ln_f

    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor, start: int | None = None) -> torch.Tensor:
        if start is None or start + ids.shape[1] > self.wpe.num_embeddings:  # the latter: plans on meta
            pos = self.wpe(position_ids)
        else:  # the same rows, and so the same sum, without a gather kernel
            pos = self.wpe.weight[start : start + ids.shape[1]]
        hidden = self.wte(ids) + pos
        return self.drop(hidden) if self.drop.training else hidden  # dropout is the identity at inference

    def run_layer(self, i, hidden, mask, cache, position_ids, ctx):
        return self.layers[i](hidden, past_key_values=cache, attention_mask=mask, position_ids=position_ids)

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)


class LlamaArch(Arch):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__(hf)
        m = hf.model
        self.embed_tokens, self.layers, self.final_norm, self.rotary = m.embed_tokens, m.layers, m.norm, m.rotary_emb

    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor, start: int | None = None) -> torch.Tensor:
        return self.embed_tokens(ids)

    def context(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        return {"position_embeddings": self.rotary(hidden, position_ids)}

    def run_layer(self, i, hidden, mask, cache, position_ids, ctx):
        return self.layers[i](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            position_embeddings=ctx["position_embeddings"],
        )

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden)


def make_arch(hf: nn.Module) -> Arch:
    """The adapter for a loaded HF causal LM. Raises BadArgument for an unsupported family."""
    mt = hf.config.model_type
    if mt == "gpt2":
        return GPT2Arch(hf)
    if mt in LLAMA_LIKE:
        return LlamaArch(hf)
    raise BadArgument(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
