"""The model registry: weights loaded once, shared by every session on them, counted by reference.

Rules: loading and unloading run on the device worker; the registry's own
fields are the loop thread's. A model with sessions cannot be unloaded (EBUSY).
A name holds one spec in one dtype: a load that asks for another gets EEXIST.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import EBUSY, EEXIST, EINVAL, ENOENT

if TYPE_CHECKING:
    from .core import Kernel

__all__ = ["Loaded", "ModelRegistry"]


@dataclass(eq=False)
class Loaded:
    name: str
    spec: str
    model: Any  # drivers.model LoadedModel; used only on the worker
    sessions: int = 0
    loaded_s: float = field(default_factory=time.monotonic)

    @property
    def max_positions(self) -> int:
        return int(self.model.max_positions)

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"name": self.name, "spec": self.spec, "dtype": str(m.dtype).removeprefix("torch."),
                "params": int(m.n_params), "text_nbytes": int(m.text_nbytes), "sessions": self.sessions,
                "layers": int(m.n_layers), "hidden_size": int(m.hidden_size), "vocab_size": int(m.vocab_size),
                "max_positions": self.max_positions, "kv_nbytes_per_token": int(m.bytes_per_token),
                "tokenizer": m.tokenizer is not None, "batched_decode": m.batch_stat(),
                "prefill_graphs": m.prefill_stat()}


class ModelRegistry:
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self._by_name: dict[str, Loaded] = {}
        self.default_name: str | None = None

    async def load(self, spec: str, *, name: str | None, dtype: str | None) -> Loaded:
        from djinn.drivers.model import load_model

        name = name or spec
        wanted = self._dtype(dtype)
        existing = self._by_name.get(name)
        if existing is not None:
            if existing.spec != spec:
                raise EEXIST(f"a model named {name!r} is already loaded from {existing.spec!r}; unload it first "
                             "or choose another name")
            have = existing.model.dtype
            if wanted is not None and wanted != have:
                raise EEXIST(f"model {name!r} is already loaded as {str(have).removeprefix('torch.')}, not "
                             f"{str(wanted).removeprefix('torch.')}; unload it first (unload_model) or load it "
                             "under another name (name=...)", details={"argument": "dtype"})
            return existing
        mem = self.k.memory

        def load() -> Any:
            import torch

            model = load_model(spec, device=mem.device, dtype=dtype, vmu=mem.vmu)
            if mem.device.type == "cuda":  # the sessions' streams do not wait on this one by themselves
                torch.cuda.current_stream(mem.device).synchronize()
            return model

        model = await self.k.worker.run(load)
        loaded = self._by_name[name] = Loaded(name=name, spec=spec, model=model)
        if self.default_name is None:
            self.default_name = name
        return loaded

    def _dtype(self, dtype: str | None) -> Any:
        """The torch dtype `dtype` names (any alias the driver takes), or None for no preference. EINVAL
        if it names none, so a bad dtype is refused whether or not the model is loaded."""
        if dtype is None:
            return None
        from djinn.drivers.errors import BadArgument
        from djinn.drivers.model import resolve_dtype

        try:
            return resolve_dtype(dtype, self.k.memory.device)
        except BadArgument as e:
            raise EINVAL(str(e), details={"argument": "dtype"}) from None

    def resolve(self, name: str | None) -> Loaded | None:
        """The named model, or the default one for None (None when nothing is loaded). ENOENT if unknown."""
        if name is None:
            return self._by_name.get(self.default_name) if self.default_name else None
        loaded = self._by_name.get(name)
        if loaded is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ENOENT(f"no model named {name!r} is loaded (loaded: {known}); load it with load_model first")
        return loaded

    def get(self, name: str) -> Loaded:
        loaded = self.resolve(name)
        assert loaded is not None
        return loaded

    def release(self, name: str) -> None:
        loaded = self._by_name.get(name)
        if loaded is not None:
            loaded.sessions = max(0, loaded.sessions - 1)

    async def unload(self, name: str) -> None:
        loaded = self.resolve(name)
        assert loaded is not None
        if loaded.sessions:
            raise EBUSY(f"model {name!r} has {loaded.sessions} open session(s); close them first")
        del self._by_name[name]
        if self.default_name == name:
            self.default_name = next(iter(self._by_name), None)
        await self.k.worker.run(loaded.model.unload)

    async def unload_all(self) -> None:
        for name in list(self._by_name):
            loaded = self._by_name.pop(name)
            await self.k.worker.run(loaded.model.unload)
        self.default_name = None

    def snapshot(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self._by_name.values()]
