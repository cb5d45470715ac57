"""``python -m fxqp``: the command line (:mod:`fxqp.cli`)."""

import sys

from fxqp.cli import main

sys.exit(main())
