"""`python -m djinn.top`: the same as the `djinn-top` console script."""

import sys

from .app import main

sys.exit(main())
