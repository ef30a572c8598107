"""``python -m service.hospital.outbox_cli PATH COMMAND``: the outbox file for an operator, service running or not.

Commands: ``stats``; ``list [--state dead|pending|delivered]`` (one JSON object a line, no SR bytes);
``retry (--all | --id N ...)`` and ``drop (--all | --id N ...)`` (dead letters only, as the admin API);
``backup DEST`` (a consistent copy while the service writes, by SQLite's online backup; created 0600: it
holds patient data). A running service picks up a retried letter at its next pass (within 5 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from service.errors import OutboxUnavailable
from service.hospital.outbox import SqliteOutbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.hospital.outbox_cli", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the outbox file (LESIONSERVE_OUTBOX_PATH)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats")
    listing = sub.add_parser("list")
    listing.add_argument("--state", choices=("dead", "pending", "delivered"), default="dead")
    listing.add_argument("--limit", type=int, default=1000)
    for name in ("retry", "drop"):
        cmd = sub.add_parser(name)
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true")
        which.add_argument("--id", type=int, nargs="+", dest="ids")
    backup = sub.add_parser("backup")
    backup.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if not args.path.is_file():  # never create an empty outbox where an operator mistyped the path
        print(f"outbox: {args.path} does not exist", file=sys.stderr)
        return 2
    try:
        box = SqliteOutbox(args.path, max_items=sys.maxsize, max_bytes=sys.maxsize)
    except OutboxUnavailable as exc:
        print(f"outbox: {exc.detail}", file=sys.stderr)
        return 2
    try:
        if args.command == "stats":
            print(json.dumps(dataclasses.asdict(box.stats())))
        elif args.command == "list":
            for row in box.letters(args.state, args.limit):
                print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if k != "payload"}))
        elif args.command == "retry":
            print(f"{box.requeue(None if args.all else args.ids, time.time())} dead letters back to pending")
        elif args.command == "drop":
            print(f"{box.drop(None if args.all else args.ids)} dead letters dropped")
        else:
            box.backup(args.dest)
            print(f"copied to {args.dest}")
    except OutboxUnavailable as exc:
        print(f"outbox: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        box.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
