"""The results file of ``lesionserve classify``: one row per image, CSV or JSON Lines, appended and resumable.

Each row is written and flushed as soon as its answer arrives, so a run stopped anywhere (Ctrl-C, a crash,
a lost connection) leaves every answered image on disk, and the next run skips it. A row with a permanent
error (the image's own fault: 4xx) is kept as the answer; one with a transient error (503 after the retries,
no connection) is tried again by the next run, which appends a new row: the last row for a path counts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any

HEAD = ["path", "sha256", "top_class"]
TAIL = ["malignancy_score", "malignant", "ood", "model_name", "model_version", "model_sha256", "request_id", "status",
        "error"]  # fmt: skip


class ResultsMismatch(Exception):
    """The existing file was written for other classes (another model family): rows would not line up."""


def columns(classes: list[str]) -> list[str]:
    return [*HEAD, *(f"p_{c}" for c in classes), *TAIL]


def is_final(row: dict[str, Any]) -> bool:
    """Answered, or refused for the image's own reason (4xx): nothing a retry could change."""
    return not row.get("error") or str(row.get("status", "")).startswith("4")


class ResultsFile:
    """Append-only rows; ``done`` holds the paths an earlier run settled.

    Args:
        path: the file (created if missing).
        fmt: ``csv`` or ``jsonl``.
        classes: the model's classes, in its order (one ``p_<class>`` column each).

    Raises:
        ResultsMismatch: the existing file has other columns.
    """

    def __init__(self, path: Path, fmt: str, classes: list[str]) -> None:
        self.fmt, self.columns = fmt, columns(classes)
        rows = self._read(path) if path.exists() and path.stat().st_size else []
        self.done = {row["path"] for row in rows if is_final(row)}
        new = not rows and not (path.exists() and path.stat().st_size)
        self._fh: IO[str] = path.open("a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._fh, self.columns) if fmt == "csv" else None
        if self._csv is not None and new:
            self._csv.writeheader()
            self._fh.flush()

    def _read(self, path: Path) -> list[dict[str, Any]]:
        with path.open(encoding="utf-8", newline="") as fh:
            if self.fmt == "csv":
                reader = csv.DictReader(fh)
                if reader.fieldnames != self.columns:
                    raise ResultsMismatch(
                        f"{path} has columns for other classes ({', '.join(reader.fieldnames or [])}); "
                        "write to a new --out"
                    )
                return list(reader)
            rows = []
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed mid-write: that image is redone
                    continue
                if not isinstance(row, dict) or sorted(row) != sorted(self.columns):
                    raise ResultsMismatch(f"{path} line {n} has fields for other classes; write to a new --out")
                rows.append(row)
            return rows

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow(row)
        else:
            self._fh.write(json.dumps({c: row.get(c) for c in self.columns}) + "\n")
        self._fh.flush()  # a stopped run keeps every row written so far

    def close(self) -> None:
        self._fh.close()
