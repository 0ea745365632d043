"""``python -m unidetox COMMAND [OVERRIDE ...]``: the same as the ``unidetox`` command."""

import sys

from unidetox.cli import main

sys.exit(main())
