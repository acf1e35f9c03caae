"""``python -m service.cli``: the ``omnet`` command line."""

import sys

from service.cli import main

sys.exit(main())
