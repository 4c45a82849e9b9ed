"""Devices and segment sizes from config: absolute sizes or fractions of the memory free at boot.

Rules: an int is bytes. A string is bytes ("4096"), bytes with a unit ("4GiB",
"4096MB", "512 K"), or a fraction ("0.5", "50%"). A float is a fraction. Units are
powers of 1024 whatever their spelling (K, KB and KiB alike), as in the kernel's
config. Fractions are resolved against the memory free at boot: the device's free
memory on CUDA, the host's available RAM otherwise (and for the host pool).
"""

from __future__ import annotations

import os
import re

from ..errors import BadArgument

__all__ = [
    "resolve_device", "parse_size", "resolve_size", "device_free_nbytes", "host_available_nbytes", "format_nbytes",
    "DEFAULT_HOST_AVAILABLE_NBYTES",
]

DEFAULT_HOST_AVAILABLE_NBYTES = 8 << 30  # used when the OS will not tell us how much RAM is available

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


def resolve_size(spec: int | float | str, *, available_nbytes: int) -> int:
    """Bytes for `spec`: absolute sizes as given, fractions times `available_nbytes` (floored)."""
    value = parse_size(spec)
    if isinstance(value, float):
        return int(value * available_nbytes)
    return value


def host_available_nbytes() -> int:
    """RAM available to new allocations: MemAvailable from /proc/meminfo, else free pages, else a default."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_HOST_AVAILABLE_NBYTES


def device_free_nbytes(device: object) -> int:
    """Free memory of `device` (a torch.device): cudaMemGetInfo on CUDA, available RAM on CPU."""
    import torch

    dev = torch.device(device)  # type: ignore[arg-type]
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return host_available_nbytes()


def format_nbytes(nbytes: int) -> str:
    """'1.5 GiB'-style text for messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def resolve_device(spec: str | object = "auto") -> tuple[object, str]:
    """(torch.device, display name) for "auto", "cpu", "cuda" or "cuda:N". "auto" takes CUDA if present.
    BadArgument if CUDA is asked for and absent, or the spec is not a device."""
    import torch

    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise BadArgument(f"device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu"), "cpu"
    if dev.type != "cuda":
        raise BadArgument(f"device {spec!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise BadArgument(f"device {spec!r}: CUDA is not available on this machine; use cpu or auto")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise BadArgument(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    dev = torch.device("cuda", index)
    return dev, f"{dev} ({torch.cuda.get_device_name(dev)})"
