"""Handlers: load_model, unload_model, models (a plain function: answered inline on the loop)."""

from __future__ import annotations

from typing import Any


async def load_model(k: Any, call: Any, *, spec: str, name: str | None, dtype: str | None) -> dict[str, Any]:
    loaded = await k.models.load(spec, name=name, dtype=dtype)
    return loaded.describe()


async def unload_model(k: Any, call: Any, *, name: str) -> dict[str, Any]:
    await k.models.unload(name)
    return {"unloaded": name}


def models(k: Any, call: Any) -> dict[str, Any]:
    return {"models": k.models.snapshot(), "default": k.models.default_name}
