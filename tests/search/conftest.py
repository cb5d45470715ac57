"""The search tests import their tiny task (tiny.py) from this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
