"""djinn: the client library for the Djinn tensor operating system."""

from djinn.kernel.errors import KernelError

__version__ = "0.1.0"
__all__ = ["KernelError", "__version__"]
