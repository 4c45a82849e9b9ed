"""Weights in the Text segment: every parameter and buffer of a model becomes a view into one allocation.

Rules: a model's tensors are laid out once, 256-byte aligned, in one range
obtained from a text allocator (the VMU's Text segment, or a plain device
tensor when there is no VMU). Tied parameters are placed once and every module
that shares them points at the same view. Floating parameters take the model's
dtype; buffers keep their own dtype (RoPE frequencies stay float32).
`TextRange.free()` is called by `LoadedModel.unload()` only, after the model
has dropped its modules, so no view outlives its range in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import BadArgument

__all__ = [
    "TextRange",
    "TextAllocator",
    "PlainTextRange",
    "plain_text_allocator",
    "text_allocator_from_vmu",
    "pack_into_text",
    "random_fill",
    "materialize_meta_buffers",
    "ALIGN_NBYTES",
]

ALIGN_NBYTES = 256  # CUDA kernels want 16 B; 256 keeps every tensor on its own cache-line group


class TextRange(Protocol):
    """One allocation in the Text segment. `tensor` is a 1-D uint8 tensor of exactly `nbytes` on the model's device."""

    tensor: torch.Tensor
    nbytes: int

    def free(self) -> None: ...


TextAllocator = Callable[[int], TextRange]


@dataclass(slots=True)
class PlainTextRange:
    """A text range backed by an ordinary device tensor (no VMU). `free()` drops the reference."""

    tensor: torch.Tensor
    nbytes: int

    def free(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8, device=self.tensor.device)


def plain_text_allocator(device: torch.device) -> TextAllocator:
    """An allocator that gives each model its own device tensor."""

    def alloc(nbytes: int) -> TextRange:
        return PlainTextRange(torch.empty(nbytes, dtype=torch.uint8, device=device), nbytes)

    return alloc


@dataclass(slots=True)
class _VMUTextRange:
    tensor: torch.Tensor
    nbytes: int
    _release: Callable[[], None]

    def free(self) -> None:
        self._release()
        self.tensor = torch.empty(0, dtype=torch.uint8, device=self.tensor.device)


def text_allocator_from_vmu(vmu: Any) -> TextAllocator:
    """Allocate from the VMU's Text segment: `vmu.text.alloc(nbytes) -> offset`, `vmu.text.view(dtype,
    shape, offset)`, `vmu.text.free(offset)`. Raises BadArgument when `vmu` has no such segment."""
    seg = getattr(vmu, "text", None)
    if seg is None or not all(hasattr(seg, n) for n in ("alloc", "view", "free")):
        raise BadArgument(f"{type(vmu).__name__} has no Text segment (vmu.text.alloc/view/free)")

    def alloc(nbytes: int) -> TextRange:
        off = seg.alloc(nbytes)
        return _VMUTextRange(seg.view(torch.uint8, (nbytes,), off), nbytes, lambda: seg.free(off))

    return alloc


def _slots(model: nn.Module) -> tuple[list[tuple[nn.Module, str, torch.Tensor, bool]], list[torch.Tensor]]:
    """Every (module, name, tensor, is_param) slot, and the unique tensors in first-seen order."""
    slots: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    unique: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                slots.append((mod, name, p, True))
                unique.setdefault(id(p), p)
        for name, b in mod._buffers.items():
            if b is not None:
                slots.append((mod, name, b, False))
                unique.setdefault(id(b), b)
    return slots, list(unique.values())


def _target_dtype(t: torch.Tensor, is_param: bool, dtype: torch.dtype) -> torch.dtype:
    return dtype if (is_param and t.is_floating_point()) else t.dtype


def pack_into_text(
    model: nn.Module,
    alloc: TextAllocator,
    dtype: torch.dtype,
    fill: Callable[[str, torch.Tensor], None] | None = None,
) -> TextRange:
    """Move every parameter and buffer of `model` into one text range; return the range.

    Without `fill`, values are copied (and cast) from the current tensors, which may live on
    any device, including the CPU. With `fill(name, view)`, parameters are written by `fill`
    instead (for meta-built dummy models); buffers are always copied.
    """
    slots, unique = _slots(model)
    is_param = {id(t): p for _, _, t, p in slots}
    names: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        for n, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                names.setdefault(id(t), f"{mod_name}.{n}" if mod_name else n)
    offsets: dict[int, int] = {}
    cursor = 0
    for t in unique:
        nbytes = t.numel() * _target_dtype(t, is_param[id(t)], dtype).itemsize
        offsets[id(t)] = cursor
        cursor += -(-nbytes // ALIGN_NBYTES) * ALIGN_NBYTES
    text = alloc(max(cursor, ALIGN_NBYTES))
    new: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for t in unique:
            td = _target_dtype(t, is_param[id(t)], dtype)
            off = offsets[id(t)]
            view = text.tensor[off : off + t.numel() * td.itemsize].view(td).view(t.shape)
            if fill is not None and is_param[id(t)]:
                fill(names[id(t)], view)
            elif t.device.type == "meta":
                raise BadArgument(f"tensor {names[id(t)]} has no values (meta) and no fill was given")
            else:
                view.copy_(t)
            new[id(t)] = nn.Parameter(view, requires_grad=False) if is_param[id(t)] else view
    for mod, name, t, param in slots:
        if param:
            mod._parameters[name] = new[id(t)]  # type: ignore[assignment]
        else:
            mod._buffers[name] = new[id(t)]
    return text


def random_fill(device: torch.device, seed: int = 0) -> Callable[[str, torch.Tensor], None]:
    """A cheap on-device initialiser for dummy weights: biases 0, 1-D weights (norms) 1, matrices N(0, 0.02)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def fill(name: str, view: torch.Tensor) -> None:
        if name.endswith("bias"):
            view.zero_()
        elif view.dim() == 1:
            view.fill_(1.0)
        else:
            view.normal_(0.0, 0.02, generator=gen)

    return fill


def materialize_meta_buffers(model: nn.Module) -> None:
    """Give real (CPU) values to buffers of a meta-built model by rebuilding their owner modules from the config.

    Buffers in the supported families are RoPE frequency tables, owned by a module with a `config`.
    Raises BadArgument for a meta buffer whose owner cannot be rebuilt that way.
    """
    for mod_name, mod in list(model.named_modules()):
        metas = [n for n, b in mod._buffers.items() if b is not None and b.device.type == "meta"]
        if not metas:
            continue
        cfg = getattr(mod, "config", None)
        if cfg is None:
            raise BadArgument(f"cannot give values to meta buffers {metas} of {mod_name or 'the model'}")
        with torch.device("cpu"):
            fresh = type(mod)(config=cfg)
        for n in metas:
            mod._buffers[n] = fresh._buffers[n]
