"""Argument schemas for syscalls, and the one validator that applies them.

Rules: a schema is data (`Arg` rows). `validate(spec, args)` returns the
arguments with defaults filled in, or raises EINVAL naming the argument and what
was expected. Unknown arguments are errors too, so a typo never passes silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from djinn.kernel.errors import EINVAL

__all__ = ["Arg", "validate", "KINDS"]

_MISSING = object()


def _is_tensor(v: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, torch.Tensor)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_int(x) for x in v)


def _ids(v: Any) -> bool:
    if isinstance(v, str):
        return True
    if _int_list(v):
        return True
    if _is_tensor(v):
        return (not v.is_floating_point()) and (not v.is_complex()) and v.dim() in (1, 2)
    return False


def _logits_mode(v: Any) -> bool:
    return v in ("last", "all", "none") or (_int(v) and v > 0)


# kind -> (predicate, how to say what was expected)
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_int, "an integer"),
    "number": (_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "map": (lambda v: isinstance(v, dict), "a map"),
    "tensor": (_is_tensor, "a tensor"),
    "ids": (_ids, "token ids: a list of integers, a 1-D or 2-D integer tensor, or text"),
    "int_list": (_int_list, "a list of integers"),
    "logits": (_logits_mode, '"last", "all", "none", or a positive integer k (top-k)'),
    "session": (lambda v: isinstance(v, str) and 0 < len(v) <= 128, "a session id string"),
    "checkpoint": (lambda v: isinstance(v, str) and 0 < len(v) <= 128, "a checkpoint id string"),
    "any": (lambda v: True, "any value"),
}


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: name, kind (a key of KINDS), and constraints."""

    name: str
    kind: str
    required: bool = True
    default: Any = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False  # `min` itself is refused: the value must be > min
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown argument kind {self.kind!r}")


def validate(call: str, spec: tuple[Arg, ...], args: Any) -> dict[str, Any]:
    """Check `args` against `spec`; fill defaults. Raises EINVAL with the argument named."""
    if not isinstance(args, dict):
        raise EINVAL(f"{call}: arguments must be a map, got {type(args).__name__}")
    known = {a.name for a in spec}
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        raise EINVAL(f"{call}: unknown argument(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known)) or 'none'}",
                     details={"arguments": unknown})
    out: dict[str, Any] = {}
    for a in spec:
        v = args.get(a.name, _MISSING)
        if v is _MISSING:
            if a.required:
                raise EINVAL(f"{call}: argument {a.name!r} is required ({KINDS[a.kind][1]})", details={"argument": a.name})
            out[a.name] = a.default
            continue
        if v is None and (a.nullable or not a.required):
            out[a.name] = a.default if not a.nullable else None
            continue
        ok, expected = KINDS[a.kind]
        if not ok(v):
            raise EINVAL(f"{call}: argument {a.name!r} must be {expected}, got {_describe(v)}", details={"argument": a.name})
        if a.choices is not None and v not in a.choices:
            raise EINVAL(f"{call}: argument {a.name!r} must be one of {', '.join(map(repr, a.choices))}, got {v!r}",
                         details={"argument": a.name})
        if a.min is not None and _number(v) and (v <= a.min if a.min_exclusive else v < a.min):
            raise EINVAL(f"{call}: argument {a.name!r} must be {'>' if a.min_exclusive else '>='} {a.min}, got {v}",
                         details={"argument": a.name})
        if a.max is not None and _number(v) and v > a.max:
            raise EINVAL(f"{call}: argument {a.name!r} must be <= {a.max}, got {v}", details={"argument": a.name})
        out[a.name] = v
    return out


def _describe(v: Any) -> str:
    if _is_tensor(v):
        return f"a tensor of dtype {str(v.dtype).removeprefix('torch.')} and shape {list(v.shape)}"
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(v).__name__} {text}"
