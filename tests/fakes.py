"""Shared test fakes: an arena with the VMU's Arena contract, and tiny HF models saved to directories.

`FakeArena` is a uint8 tensor with `view()` / `mark_used()` / `generation` / `residency`; it starts
filled with 0xFF bytes (NaN in every float dtype) so that reading an unwritten byte shows up.
`move()`, `page_out()` / `page_in()` keep only the used prefix, like the VMU. `save_tiny(kind, path)`
builds a seeded tiny model of one family and saves it with `save_pretrained`. `ConnectionKernel`
is what a `kernel.server.Connection` needs of the kernel. `requires_affinity` skips a test that pins
threads to CPUs where the platform cannot (only Linux can).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

__all__ = [
    "requires_affinity",
    "FakeArena",
    "TINY_KINDS",
    "tiny_config",
    "build_tiny",
    "save_tiny",
    "hf_reference",
    "FakeTextAllocator",
]

requires_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")

GARBAGE = 0xFF  # every float dtype reads 0xFF.. bytes as NaN


class ConnectionKernel:
    """The part of the Kernel a Connection uses: limits, stats, the connection set."""

    alloc_payload = None
    shutting_down = False

    def __init__(self) -> None:
        from djinn.kernel import abi
        from djinn.kernel.stats import SyscallStats

        self.limits = abi.DEFAULT_LIMITS
        self.stats = SyscallStats()
        self.connections: set[Any] = set()
        self.closed: list[Any] = []

    def connection_closed(self, conn: Any) -> None:
        self.closed.append(conn)


class FakeArena:
    """Stand-in for drivers.vmu.Arena (same attributes and view()/touch()/mark_used() contract)."""

    def __init__(self, nbytes: int, device: str | torch.device = "cpu", session: object = "s-test") -> None:
        self.session = session
        self.nbytes = nbytes
        self.used_nbytes = 0
        self.generation = 0
        self.residency = "device"
        self.device = torch.device(device)
        self.data = torch.full((nbytes,), GARBAGE, dtype=torch.uint8, device=self.device)
        self._host: torch.Tensor | None = None
        self.touches = 0  # touch() calls: driver calls that kept their views

    def view(self, dtype: torch.dtype, shape: Sequence[int] | int, offset: int = 0) -> torch.Tensor:
        if self.residency != "device":
            raise RuntimeError("view() of a swapped arena")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + nbytes > self.nbytes:
            raise ValueError(f"view [{offset}, {offset + nbytes}) outside an arena of {self.nbytes} bytes")
        return self.data.narrow(0, offset, nbytes).view(dtype).view(shape)

    def touch(self) -> None:
        if self.residency != "device":
            raise RuntimeError("touch() of a swapped arena")
        self.touches += 1

    def mark_used(self, end_offset: int) -> None:
        assert 0 <= end_offset <= self.nbytes, end_offset
        self.used_nbytes = max(self.used_nbytes, end_offset)

    # -- what the VMU does to an arena --------------------------------------------------------------
    def used_bytes(self) -> torch.Tensor:
        """A copy of the used prefix (a snapshot's bytes)."""
        return self.data[: self.used_nbytes].clone()

    def load(self, prefix: torch.Tensor) -> None:
        """Restore a snapshot's bytes into this arena (from offset 0)."""
        self.data[: prefix.numel()].copy_(prefix)
        self.used_nbytes = prefix.numel()

    def move(self) -> None:
        """New storage holding only the used prefix (grow-by-move / page-in): old views are stale."""
        fresh = torch.full((self.nbytes,), GARBAGE, dtype=torch.uint8, device=self.device)
        fresh[: self.used_nbytes].copy_(self.data[: self.used_nbytes])
        self.data.fill_(GARBAGE)  # stale views now read garbage
        self.data = fresh
        self.generation += 1

    def page_out(self) -> None:
        self._host = self.data[: self.used_nbytes].to("cpu", copy=True)
        self.data = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.residency = "host"

    def page_in(self) -> None:
        assert self._host is not None
        self.data = torch.full((self.nbytes,), GARBAGE, dtype=torch.uint8, device=self.device)
        self.data[: self._host.numel()].copy_(self._host)
        self._host = None
        self.residency = "device"
        self.generation += 1


class FakeTextAllocator:
    """A text allocator (callable) that records what it handed out and what was freed."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.ranges: list[Any] = []
        self.freed = 0

    def __call__(self, nbytes: int) -> Any:
        outer = self

        class _Range:
            def __init__(self) -> None:
                self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=outer.device)
                self.nbytes = nbytes

            def free(self) -> None:
                outer.freed += 1

        r = _Range()
        self.ranges.append(r)
        return r


TINY_KINDS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def tiny_config(kind: str, **overrides: Any) -> Any:
    """A tiny config of one family: 3 layers, hidden 64, vocab 300, 256 positions; GQA for the RoPE ones;
    sliding windows of 8 for Mistral (all layers) and Qwen2 (layers 1 and 2); Qwen3 adds q/k norms."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    # initializer_range 0.15 (not 0.02): random tiny models then emit varied tokens, not one repeated id
    common = dict(vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=256, **common)
    else:
        rope = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=256, **common)
        if kind == "llama":
            cfg = LlamaConfig(**rope)
        elif kind == "mistral":
            cfg = MistralConfig(sliding_window=8, **rope)  # a window smaller than the tests' sequences
        elif kind == "qwen2":
            cfg = Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **rope)
        elif kind == "qwen3":
            cfg = Qwen3Config(head_dim=16, **rope)
        else:
            raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny(kind: str, seed: int = 0, attn_implementation: str = "eager", **overrides: Any) -> Any:
    """A seeded tiny HF causal LM (fp32, CPU, eval mode)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = tiny_config(kind, **overrides)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def save_tiny(kind: str, path: Path, seed: int = 0, dtype: torch.dtype | None = None, **overrides: Any) -> Path:
    """Save a seeded tiny model of `kind` (optionally cast to `dtype`) into `path`; returns `path`."""
    model = build_tiny(kind, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(path))
    return path


def hf_reference(path: Path, attn_implementation: str = "eager") -> Any:
    """The same saved model loaded by plain transformers (fp32, CPU), for comparisons."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()
