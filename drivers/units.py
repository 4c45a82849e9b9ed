"""Size settings: one parser for the kernel's config and the VMU. Pure, no torch.

Rules: an int is bytes. A string is bytes ("4096"), bytes with a unit ("4GiB",
"4096MB", "512 K"), or a fraction ("0.5", "50%"). A float is a fraction in [0, 1].
Units are powers of 1024 whatever their spelling (K, KB and KiB alike). Fractions
are returned as floats, for the caller to resolve against the memory free at boot.
"""

from __future__ import annotations

import re

from .errors import BadArgument

__all__ = ["parse_size"]

_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: 1 << (10 * power) for power, prefix in enumerate("kmgt", 1) for suffix in ("", "b", "ib")
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(spec: int | float | str) -> int | float:
    """An int number of bytes, or a float fraction in [0, 1]. BadArgument on anything else."""
    if isinstance(spec, bool):
        raise BadArgument(f"size {spec!r} is a bool; give bytes, a unit size such as '4GiB', or a fraction")
    if isinstance(spec, int):
        if spec < 0:
            raise BadArgument(f"size {spec} is negative")
        return spec
    if isinstance(spec, float):
        return _fraction(spec, repr(spec))
    if not isinstance(spec, str):
        raise BadArgument(f"size {spec!r} has type {type(spec).__name__}; give an int, float or str")
    text = spec.strip()
    if text.endswith("%"):
        try:
            return _fraction(float(text[:-1]) / 100.0, spec)
        except ValueError:
            raise BadArgument(f"size {spec!r}: not a percentage") from None
    m = _SIZE_RE.match(text)
    if m is None:
        raise BadArgument(f"size {spec!r}: expected bytes ('4096'), a unit size ('4GiB', '512MB') "
                          "or a fraction ('0.5')")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        raise BadArgument(f"size {spec!r}: unknown unit {m.group(2)!r}; use B, KiB/MiB/GiB/TiB (or K/KB, M/MB, "
                          "G/GB, T/TB: all powers of 1024)")
    if "." in number and not unit:
        return _fraction(float(number), spec)
    nbytes = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    return int(nbytes)


def _fraction(x: float, spec: str) -> float:
    if not 0.0 <= x <= 1.0:
        raise BadArgument(f"size {spec}: a fraction must lie in [0, 1] (of the memory free at boot)")
    return x
