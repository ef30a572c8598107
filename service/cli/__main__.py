"""``python -m service.cli``: the ``lesionserve`` command without its console script."""

import sys

from service.cli import main

sys.exit(main())
