"""``python -m predictopt``: the ``predictopt`` command line (:mod:`predictopt.cli`)."""

from __future__ import annotations

import sys

from predictopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
