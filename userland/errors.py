"""One exception class per errno code, the same classes the kernel raises.

    try:
        session.forward(ids)
    except djinn.errors.ENOMEM as e:
        if e.retryable: ...
"""

from djinn.kernel.errors import *  # noqa: F401,F403
from djinn.kernel.errors import __all__  # noqa: F401
