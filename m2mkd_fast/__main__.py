"""``python -m m2mkd_fast`` = the ``m2mkd-fast`` command."""

import sys

from .cli import main

sys.exit(main())
