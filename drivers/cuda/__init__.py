"""CUDA compute streams for the device worker (a small pool that sessions are spread over), and uploads of
host tensors that do not wait for the device."""

from .pool import StreamPool, current_stream_id
from .upload import to_device

__all__ = ["StreamPool", "current_stream_id", "to_device"]
