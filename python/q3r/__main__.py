"""``python -m q3r ...``: the ``q3r`` command (q3r.cli)."""

import sys

from .cli import main

sys.exit(main())
