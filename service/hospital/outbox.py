"""The SR outbox: every result for a PACS is written here, durably, before its sender hears success.

One SQLite file in WAL mode (``LESIONSERVE_OUTBOX_PATH``), no server to run. Each row ("letter") is one SR
(Part-10 bytes) with its destination; :mod:`service.hospital.delivery` takes the due ones, delivers them and
records what happened. States: ``pending`` (waiting or between retries) -> ``delivered`` (kept for
``OUTBOX_RETENTION_S``, its SR bytes deleted then) or ``dead`` (kept, with the reason, until an operator
retries or drops it).

Why SQLite with ``synchronous=FULL``: a C-STORE answered Success is a promise that the result will reach the
PACS; the commit must survive a kill -9 and a power cut, and the file must be one thing to back up. Why the
key is the SR's SOP Instance UID: it is a function of the source image and the model
(:func:`service.hospital.sr.make_sr`), so a letter sent again after a crash between the PACS storing it and
this file recording it is the same instance, which a PACS stores once. A second write of a letter pending or
delivered (within the retention) is a no-op; of a dead one revives it (the PACS resending the image is a retry).

The file holds patient data (the SRs carry the patient's name and ID): it is created 0600 (SQLite gives its
``-wal`` and ``-shm`` files the database's mode), and a delivered SR's bytes are deleted.

:class:`Outbox` is the interface the rest uses; :class:`SqliteOutbox` the one backend (a Postgres table or a
queue could implement the same methods; ``backup`` is SQLite's own).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.errors import OutboxFull, OutboxUnavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS letters (
    id INTEGER PRIMARY KEY,
    sr_uid TEXT NOT NULL,
    kind TEXT NOT NULL,              -- dimse | stow-rs
    destination TEXT NOT NULL,       -- AE@host:port | DICOMweb base URL
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    payload BLOB,                    -- the SR, Part 10; NULL once delivered
    bytes INTEGER NOT NULL,
    request_id TEXT NOT NULL,        -- the request that made it (audit trail)
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    done_at REAL,
    reason TEXT,                     -- a dead letter's reason (refused, attempts, age)
    error TEXT                       -- the last failure, PHI-free
);
CREATE UNIQUE INDEX IF NOT EXISTS letters_key ON letters (sr_uid, kind, destination);
CREATE INDEX IF NOT EXISTS letters_due ON letters (state, next_at);
"""
_COLUMNS = (
    "id, sr_uid, kind, destination, state, bytes, request_id, created_at, next_at, attempts, done_at, reason, error"
)


@dataclass(frozen=True)
class Letter:
    """An SR to deliver: its SOP Instance UID, where it goes, its bytes, and the request that made it."""

    sr_uid: str
    kind: str
    destination: str
    payload: bytes
    request_id: str


@dataclass(frozen=True)
class Row:
    """A letter as stored (``payload`` only where asked for)."""

    id: int
    sr_uid: str
    kind: str
    destination: str
    state: str
    size: int  # the SR's bytes
    request_id: str
    created_at: float
    next_at: float
    attempts: int
    done_at: float | None
    reason: str | None
    error: str | None
    payload: bytes | None = None


@dataclass(frozen=True)
class Stats:
    pending: int
    dead: int
    delivered: int  # still within the retention
    bytes: int  # of pending and dead letters
    oldest_pending_at: float | None  # created_at of the oldest pending letter


class Outbox(Protocol):
    """What the entries, the sender and the admin API need of an outbox backend."""

    def put(self, letters: Sequence[Letter]) -> int: ...
    def check_room(self, count: int = 1) -> None: ...
    def due(self, now: float, limit: int) -> list[Row]: ...
    def next_due(self) -> float | None: ...
    def delivered(self, letter_id: int, now: float) -> None: ...
    def retry(self, letter_id: int, next_at: float, error: str) -> None: ...
    def dead(self, letter_id: int, now: float, reason: str, error: str) -> None: ...
    def letters(self, state: str, limit: int = 100) -> list[Row]: ...
    def requeue(self, ids: Iterable[int] | None, now: float) -> int: ...
    def drop(self, ids: Iterable[int] | None) -> int: ...
    def purge(self, now: float, retention_s: float) -> int: ...
    def stats(self) -> Stats: ...
    def close(self) -> None: ...


def _create_private(path: Path) -> None:
    """Create ``path`` 0600 if absent (before SQLite does, with the umask's mode); tighten an existing one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:  # an older or copied file readable by others: patient data, so tighten it
            os.fchmod(fd, 0o600)
            log.warning("outbox file was readable by others; set to 0600", extra={"mode": oct(mode)})
    finally:
        os.close(fd)


def _unavailable(exc: sqlite3.Error) -> OutboxUnavailable:
    """A one-line, PHI-free reason for a failed write (SQLite's messages name no data)."""
    text = str(exc).split("\n")[0][:80] or type(exc).__name__
    return OutboxUnavailable(f"the result outbox could not be written ({text})", headers={"Retry-After": "60"})


class SqliteOutbox:
    """The outbox in one SQLite file.

    Args:
        path: the file (its folder must exist); created 0600.
        max_items: pending + dead letters held at most; a put beyond raises :class:`OutboxFull`.
        max_bytes: bytes of pending + dead SRs held at most.
        clock: wall-clock seconds (letters' ages survive a restart, so not a monotonic clock).

    Raises:
        OutboxUnavailable: the file cannot be created, opened or written (read-only folder, not a database).
    """

    def __init__(self, path: Path, *, max_items: int, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.path, self.max_items, self.max_bytes, self.clock = Path(path), max_items, max_bytes, clock
        self._lock = threading.Lock()  # one connection, used by the entries' threads and the sender
        try:
            _create_private(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the sender hears success
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxUnavailable(f"the outbox file {self.path} has schema {version}; this version reads 1")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except OSError as exc:
            raise OutboxUnavailable(f"the outbox file {self.path} cannot be created ({exc.strerror})") from None
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"the outbox file {self.path} cannot be opened ({exc})") from None

    # --- writes ------------------------------------------------------------------------------------
    def _write(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                result = fn(self._db)
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise _unavailable(exc) from None
            finally:
                if self._db.in_transaction:  # OutboxFull, or an error SQLite did not roll back itself (disk full does)
                    self._db.execute("ROLLBACK")

    def _room(self, db: sqlite3.Connection, count: int, size: int) -> None:
        held, held_bytes = db.execute(
            "SELECT count(*), coalesce(sum(bytes), 0) FROM letters WHERE state != 'delivered'"
        ).fetchone()
        if held + count > self.max_items or held_bytes + size > self.max_bytes:
            raise OutboxFull(f"the result outbox is full ({held} SRs wait for the PACS)", headers={"Retry-After": "60"})

    def check_room(self, count: int = 1) -> None:
        """Raise :class:`OutboxFull` now if ``count`` more letters would not fit (STOW-RS asks before classifying)."""
        with self._lock:
            try:
                self._room(self._db, count, 0)
            except sqlite3.Error as exc:
                raise _unavailable(exc) from None

    def put(self, letters: Sequence[Letter]) -> int:
        """Write ``letters`` in one transaction, all or none; returns how many are new (pending again).

        Raises:
            OutboxFull: over ``max_items`` or ``max_bytes`` (nothing written).
            OutboxUnavailable: the write failed (disk full, read-only, I/O; nothing written).
        """
        now = self.clock()

        def write(db: sqlite3.Connection) -> int:
            self._room(db, len(letters), sum(len(x.payload) for x in letters))
            added = 0
            for x in letters:
                key = (x.sr_uid, x.kind, x.destination)
                revived = db.execute(
                    "UPDATE letters SET state='pending', payload=?, bytes=?, request_id=?, next_at=?, attempts=0,"
                    " reason=NULL, error=NULL, done_at=NULL WHERE sr_uid=? AND kind=? AND destination=? AND state='dead'",
                    (x.payload, len(x.payload), x.request_id, now, *key),
                ).rowcount
                inserted = db.execute(
                    "INSERT OR IGNORE INTO letters (sr_uid, kind, destination, state, payload, bytes, request_id,"
                    " created_at, next_at) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                    (*key, x.payload, len(x.payload), x.request_id, now, now),
                ).rowcount
                added += revived + inserted
            return added

        return self._write(write)

    def delivered(self, letter_id: int, now: float) -> None:
        """The PACS stored it: the SR's bytes are deleted at once (patient data); the row stays for the retention."""
        self._write(
            lambda db: (
                db.execute(
                    "UPDATE letters SET state='delivered', payload=NULL, done_at=?, attempts=attempts+1, error=NULL"
                    " WHERE id=? AND state='pending'",
                    (now, letter_id),
                ).rowcount
            )
        )

    def retry(self, letter_id: int, next_at: float, error: str) -> None:
        self._write(
            lambda db: (
                db.execute(
                    "UPDATE letters SET attempts=attempts+1, next_at=?, error=? WHERE id=? AND state='pending'",
                    (next_at, error[:200], letter_id),
                ).rowcount
            )
        )

    def dead(self, letter_id: int, now: float, reason: str, error: str) -> None:
        self._write(
            lambda db: (
                db.execute(
                    "UPDATE letters SET state='dead', attempts=attempts+1, done_at=?, reason=?, error=?"
                    " WHERE id=? AND state='pending'",
                    (now, reason, error[:200], letter_id),
                ).rowcount
            )
        )

    def requeue(self, ids: Iterable[int] | None, now: float) -> int:
        """Dead letters (these ids, or all with None) back to pending, due now, with a fresh attempt count."""
        where, args = _ids_clause(ids)
        return self._write(
            lambda db: (
                db.execute(
                    "UPDATE letters SET state='pending', next_at=?, attempts=0, created_at=?, reason=NULL, done_at=NULL"
                    f" WHERE state='dead'{where}",
                    (now, now, *args),
                ).rowcount
            )
        )

    def drop(self, ids: Iterable[int] | None) -> int:
        """Delete dead letters (these ids, or all with None): the operator gives up on them. Never a pending one."""
        where, args = _ids_clause(ids)
        return self._write(lambda db: db.execute(f"DELETE FROM letters WHERE state='dead'{where}", args).rowcount)

    def purge(self, now: float, retention_s: float) -> int:
        """Delete delivered rows older than the retention."""
        return self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM letters WHERE state='delivered' AND done_at <= ?", (now - retention_s,)
                ).rowcount
            )
        )

    # --- reads -------------------------------------------------------------------------------------
    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _unavailable(exc) from None

    def due(self, now: float, limit: int) -> list[Row]:
        """Pending letters whose time has come, oldest first, with their SR bytes."""
        rows = self._read(
            f"SELECT {_COLUMNS}, payload FROM letters WHERE state='pending' AND next_at <= ? ORDER BY next_at, id LIMIT ?",
            (now, limit),
        )
        return [Row(*r) for r in rows]  # type: ignore[arg-type]

    def next_due(self) -> float | None:
        (at,) = self._read("SELECT min(next_at) FROM letters WHERE state='pending'")[0]
        return float(at) if at is not None else None  # type: ignore[arg-type]

    def letters(self, state: str, limit: int = 100) -> list[Row]:
        """Letters in ``state`` (without their SR bytes), oldest first."""
        rows = self._read(f"SELECT {_COLUMNS} FROM letters WHERE state=? ORDER BY id LIMIT ?", (state, limit))
        return [Row(*r) for r in rows]  # type: ignore[arg-type]

    def stats(self) -> Stats:
        counts = dict.fromkeys(("pending", "dead", "delivered"), 0)
        for state, n in self._read("SELECT state, count(*) FROM letters GROUP BY state"):
            counts[str(state)] = int(n)  # type: ignore[call-overload]
        held, oldest = self._read(
            "SELECT coalesce(sum(bytes), 0), (SELECT min(created_at) FROM letters WHERE state='pending')"
            " FROM letters WHERE state != 'delivered'"
        )[0]
        return Stats(
            counts["pending"], counts["dead"], counts["delivered"], int(held),  # type: ignore[call-overload]
            float(oldest) if oldest is not None else None,  # type: ignore[arg-type]
        )  # fmt: skip

    def backup(self, dest: Path) -> None:
        """A consistent copy to ``dest`` (created 0600) while the service may be writing (SQLite's online backup)."""
        _create_private(dest)
        with self._lock, sqlite3.connect(dest) as copy:
            self._db.backup(copy)
        copy.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _ids_clause(ids: Iterable[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    chosen = tuple(int(i) for i in ids)
    return (f" AND id IN ({','.join('?' * len(chosen))})", chosen) if chosen else (" AND 0", ())
