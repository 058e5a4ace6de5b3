"""``python -m diffboost`` (and ``torchrun -m diffboost batch ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
