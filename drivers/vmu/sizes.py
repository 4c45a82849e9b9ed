"""Devices and segment sizes from config: absolute sizes or fractions of the memory free at boot.

Rules: sizes are parsed by `drivers.units.parse_size` (bytes, unit sizes or
fractions), the same parser the kernel's config uses. Fractions are resolved
against the memory free at boot: the device's free memory on CUDA, the host's
available RAM otherwise (and for the host pool).
"""

from __future__ import annotations

import os

from ..errors import BadArgument
from ..units import parse_size

__all__ = [
    "resolve_device", "parse_size", "resolve_size", "device_free_nbytes", "host_available_nbytes", "format_nbytes",
    "DEFAULT_HOST_AVAILABLE_NBYTES",
]

DEFAULT_HOST_AVAILABLE_NBYTES = 8 << 30  # used when the OS will not tell us how much RAM is available

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
