"""``python -m ConformalSegLib`` runs the ``conformalseg`` command line."""

import sys

from .cli import main

sys.exit(main())
