"""Tokenizers: our own byte-level tokenizer, and a thin wrapper over a local HF tokenizer.

Rules: both expose the same small interface (`encode`, `decode`, `bos_id`,
`eos_id`, `vocab_size`); nothing here downloads. The byte tokenizer maps each
UTF-8 byte to its value (0..255) and adds BOS=256 and EOS=257.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "BOS_ID", "EOS_ID", "BYTE_VOCAB", "load_hf_tokenizer"]

BOS_ID = 256
EOS_ID = 257
BYTE_VOCAB = 258


class Tokenizer(Protocol):
    """What the kernel and the bench may rely on for any loaded model."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. Special and out-of-range ids are skipped by `decode`;
    invalid UTF-8 sequences decode as U+FFFD (a model may emit any byte order)."""

    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    vocab_size: int = BYTE_VOCAB

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face tokenizer behind the `Tokenizer` interface."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.bos_id = getattr(inner, "bos_token_id", None)
        self.eos_id = getattr(inner, "eos_token_id", None)
        self.vocab_size = len(inner)  # type: ignore[arg-type]

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(self._inner.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=True)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self._inner).__name__})"


def load_hf_tokenizer(path: Path) -> HFTokenizer | None:
    """The tokenizer saved in a model directory, or None when it has none (weights-only checkpoints)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except Exception:  # a broken tokenizer must not stop the weights from loading
        return None
