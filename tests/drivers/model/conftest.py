"""Fixtures for the model driver tests: tiny saved models (one per family), loaded once per session.

Tests that change a model's settings (decode_mode) load their own copy with `fresh_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import transformers

from djinn.drivers.model import LoadedModel, SeqState, load_model
from tests.fakes import TINY_KINDS, FakeArena, hf_reference, save_tiny

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny(kind, root / kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def tiny(tiny_dirs: dict[str, Path]) -> Callable[..., LoadedModel]:
    """tiny(kind, attn="sdpa") -> a shared LoadedModel (do not change its settings)."""
    cache: dict[tuple[str, str], LoadedModel] = {}

    def get(kind: str, attn: str = "sdpa") -> LoadedModel:
        key = (kind, attn)
        if key not in cache:
            cache[key] = load_model(str(tiny_dirs[kind]), attn_implementation=attn)
        return cache[key]

    return get


@pytest.fixture
def fresh_model(tiny_dirs: dict[str, Path]) -> Callable[..., LoadedModel]:
    """fresh_model(kind, attn="sdpa", **load_kw) -> a LoadedModel of the test's own."""

    def get(kind: str, attn: str = "sdpa", **kw: object) -> LoadedModel:
        return load_model(str(tiny_dirs[kind]), attn_implementation=attn, **kw)

    return get


@pytest.fixture(scope="session")
def reference(tiny_dirs: dict[str, Path]) -> Callable[..., object]:
    """reference(kind, attn="sdpa") -> the same weights in plain transformers."""
    cache: dict[tuple[str, str], object] = {}

    def get(kind: str, attn: str = "sdpa") -> object:
        if (kind, attn) not in cache:
            cache[(kind, attn)] = hf_reference(tiny_dirs[kind], attn)
        return cache[(kind, attn)]

    return get


def new_state(model: LoadedModel, max_tokens: int = 128) -> SeqState:
    """A state in a fresh FakeArena sized for `max_tokens`."""
    return model.new_state(FakeArena(model.arena_nbytes(max_tokens)), max_tokens)
