"""``python -m diffboost.bench``."""

import sys

from .cli import main

sys.exit(main())
