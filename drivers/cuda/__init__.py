"""CUDA compute streams for the device worker: a small pool that sessions are spread over."""

from .pool import StreamPool

__all__ = ["StreamPool"]
