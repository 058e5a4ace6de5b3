"""Shared test set-up: tiny pipeline factories live in tests/factories.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
