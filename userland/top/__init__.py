"""djinn-top: Djinn's htop. `model` (pure snapshot -> rows and rates), `source` (the daemon), `ui` (Textual).

Run it as `djinn-top` (see `djinn.top.app` for the options).
"""

from .model import View, build_view
from .query import select
from .source import KernelSource, Unavailable

__all__ = ["View", "build_view", "select", "KernelSource", "Unavailable"]
