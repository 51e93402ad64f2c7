"""``python -m fedstream``: the same as the ``fedstream`` command."""

import sys

from fedstream.cli import main

sys.exit(main())
