"""``python -m service [FLAGS]``: the same as ``lesionserve serve [FLAGS]`` (service.cli.serve).

Flags override ``LESIONSERVE_*`` variables, which override the defaults; ``--help`` lists them; an
unknown argument is an error (exit 2), never ignored.
"""

from __future__ import annotations

import sys

from service.cli import serve_main


def main(argv: list[str] | None = None) -> int:
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
