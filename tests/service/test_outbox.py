"""The SR outbox (service/hospital/outbox.py) and its sender (delivery.py), with a fake deliverer and a fake clock.

The DIMSE and STOW-RS entries writing to it are in test_dimse.py / test_dicomweb.py; a real PACS, restarts and
a kill -9 mid-delivery in tests/e2e/test_orthanc_outbox.py.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from service.audit import AuditLog
from service.errors import OutboxFull, OutboxUnavailable
from service.hospital.delivery import DeliveryFailed, OutboxSender, RetryPolicy, permanent_status
from service.hospital.outbox import Letter, Row, SqliteOutbox

PATIENT = "DOE^JANE"  # stands for the patient attributes an SR carries


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDeliverer:
    """Answers each letter from a script of outcomes (None = stored); records what it was given."""

    def __init__(self, *script: DeliveryFailed | None) -> None:
        self.script = list(script)
        self.seen: list[str] = []

    def deliver(self, letters: Sequence[Row]) -> Iterator[DeliveryFailed | None]:
        for letter in letters:
            self.seen.append(letter.sr_uid)
            assert letter.payload is not None and PATIENT.encode() in letter.payload
            yield self.script.pop(0) if self.script else None


def letter(n: int, kind: str = "dimse", size: int = 100) -> Letter:
    body = (PATIENT.encode() + b"-sr-") * (size // 12 + 1)
    return Letter(f"2.25.{n}", kind, "PACS@127.0.0.1:104", body[:size], f"request-{n}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_outbox(tmp_path: Path, clock: Clock) -> Callable[..., SqliteOutbox]:
    opened: list[SqliteOutbox] = []

    def make(max_items: int = 100, max_bytes: int = 1 << 20) -> SqliteOutbox:
        box = SqliteOutbox(tmp_path / "outbox.sqlite", max_items=max_items, max_bytes=max_bytes, clock=clock)
        opened.append(box)
        return box

    yield make
    for box in opened:
        box.close()


POLICY = RetryPolicy(base_s=2.0, max_delay_s=60.0, max_attempts=5, max_age_s=3600.0)


def sender(box: SqliteOutbox, deliverer: FakeDeliverer, clock: Clock, audit: AuditLog | None = None) -> OutboxSender:
    return OutboxSender(box, {"dimse": deliverer}, POLICY, audit=audit, clock=clock, rng=random.Random(7))


# --- the store ---------------------------------------------------------------------------------------
def test_put_then_due_delivered_and_purged(make_outbox: Callable[..., SqliteOutbox], clock: Clock) -> None:
    box = make_outbox()
    assert box.put([letter(1), letter(2)]) == 2
    due = box.due(clock.now, 10)
    assert [r.sr_uid for r in due] == ["2.25.1", "2.25.2"] and due[0].payload == letter(1).payload
    box.delivered(due[0].id, clock.now)
    (done,) = box.letters("delivered")
    assert done.payload is None and done.attempts == 1  # the SR's bytes (patient data) are gone at delivery
    stored = sqlite3.connect(box.path).execute("SELECT payload FROM letters WHERE state='delivered'").fetchone()
    assert stored == (None,)
    assert box.purge(clock.now + 10, retention_s=60) == 0 and box.purge(clock.now + 61, retention_s=60) == 1
    assert box.stats().pending == 1 and box.stats().delivered == 0


def test_the_same_sr_is_kept_once_and_a_dead_one_is_revived(
    make_outbox: Callable[..., SqliteOutbox], clock: Clock
) -> None:
    box = make_outbox()
    assert box.put([letter(1)]) == 1
    assert box.put([letter(1)]) == 0  # pending: the PACS resent the image before the SR went out
    (row,) = box.due(clock.now, 10)
    box.dead(row.id, clock.now, "refused", "the PACS answered 0x0122")
    assert box.put([letter(1)]) == 1  # the image sent again is a retry of the dead letter
    (again,) = box.due(clock.now, 10)
    assert (again.id, again.attempts, again.state, again.reason) == (row.id, 0, "pending", None)
    box.delivered(again.id, clock.now)
    assert box.put([letter(1)]) == 0  # delivered (within the retention): not sent twice


def test_full_outbox_refuses_all_of_a_put_and_keeps_what_it_has(make_outbox: Callable[..., SqliteOutbox]) -> None:
    box = make_outbox(max_items=3, max_bytes=1000)
    box.put([letter(1), letter(2)])
    with pytest.raises(OutboxFull, match=r"full \(2 SRs wait"):
        box.put([letter(3), letter(4)])  # all or none: 3 would fit, 4 would not
    assert box.stats().pending == 2
    with pytest.raises(OutboxFull):
        box.put([letter(5, size=801)])  # bytes: 200 + 801 > 1000
    with pytest.raises(OutboxFull):
        box.check_room(2)
    box.check_room(1)
    (first, _) = box.due(1e12, 10)
    box.dead(first.id, 0.0, "attempts", "x")
    with pytest.raises(OutboxFull):  # dead letters count: they are SRs not yet in the PACS
        box.put([letter(6), letter(7)])


def test_disk_full_is_a_clear_error_and_loses_nothing(make_outbox: Callable[..., SqliteOutbox], clock: Clock) -> None:
    box = make_outbox()
    box.put([letter(1)])
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "disk full": no page may be added
    with pytest.raises(OutboxUnavailable, match="database or disk is full"):
        box.put([letter(n, size=4000) for n in range(2, 10)])
    assert [r.sr_uid for r in box.due(clock.now, 10)] == ["2.25.1"]
    box._db.execute("PRAGMA query_only=1")  # the file turned read-only under the service
    with pytest.raises(OutboxUnavailable, match="readonly"):
        box.put([letter(2)])
    assert box.stats().pending == 1


def test_the_file_is_private_and_so_are_its_wal_and_shm(tmp_path: Path) -> None:
    os.umask(0o022)  # a usual umask would make files 0644
    box = SqliteOutbox(tmp_path / "outbox.sqlite", max_items=10, max_bytes=1 << 20)
    box.put([letter(1)])
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["outbox.sqlite", "outbox.sqlite-shm", "outbox.sqlite-wal"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    box.close()
    (tmp_path / "outbox.sqlite").chmod(0o644)  # restored from a backup with the wrong mode
    SqliteOutbox(tmp_path / "outbox.sqlite", max_items=10, max_bytes=1 << 20).close()
    assert stat.S_IMODE((tmp_path / "outbox.sqlite").stat().st_mode) == 0o600


def test_a_file_that_is_not_an_outbox_or_a_folder_that_is_not_writable_stops_the_start(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(OutboxUnavailable, match="cannot be opened"):
        SqliteOutbox(junk, max_items=10, max_bytes=1 << 20)
    with pytest.raises(OutboxUnavailable, match="cannot be created"):
        SqliteOutbox(tmp_path / "no-such-folder" / "outbox.sqlite", max_items=10, max_bytes=1 << 20)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutboxUnavailable, match="cannot be created"):
            SqliteOutbox(locked / "outbox.sqlite", max_items=10, max_bytes=1 << 20)


def test_pending_letters_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    box = SqliteOutbox(tmp_path / "o.sqlite", max_items=10, max_bytes=1 << 20, clock=clock)
    box.put([letter(1), letter(2)])
    box.close()  # or a kill -9: the commit was on disk before put returned (tests/e2e kills the process)
    again = SqliteOutbox(tmp_path / "o.sqlite", max_items=10, max_bytes=1 << 20, clock=clock)
    try:
        assert [r.sr_uid for r in again.due(clock.now, 10)] == ["2.25.1", "2.25.2"]
    finally:
        again.close()


def test_requeue_and_drop_touch_dead_letters_only(make_outbox: Callable[..., SqliteOutbox], clock: Clock) -> None:
    box = make_outbox()
    box.put([letter(1), letter(2), letter(3)])
    one, two, three = box.due(clock.now, 10)
    box.dead(one.id, clock.now, "refused", "x")
    box.dead(two.id, clock.now, "age", "y")
    assert box.drop([three.id]) == 0  # pending: never dropped
    assert box.drop([two.id]) == 1 and box.stats().dead == 1
    clock.now += 100
    assert box.requeue(None, clock.now) == 1
    due = box.due(clock.now, 10)
    assert {r.sr_uid for r in due} == {"2.25.1", "2.25.3"}
    (revived,) = [r for r in due if r.id == one.id]
    assert (revived.attempts, revived.created_at, revived.reason) == (0, clock.now, None)  # a fresh age
    assert box.requeue([], clock.now) == 0 and box.drop([]) == 0


# --- the sender --------------------------------------------------------------------------------------
def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (40, 60.0), (10_000, 60.0)]:
        delays = [POLICY.delay(attempts, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempts
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not one value


def test_permanent_statuses() -> None:
    assert [permanent_status(c) for c in (0x0122, 0x0124, 0xA900, 0xA9FF, 0xC000, 0xCFFF)] == [True] * 6
    assert [permanent_status(c) for c in (0xA700, 0xA7FF, 0x0110, 0x0211, 0xFE00)] == [False] * 5


def counter(name: str, **labels: str) -> float:
    """A sample of the process's registry (what /metrics serves); counters are process-wide: compare before/after."""
    return float(REGISTRY.get_sample_value(name, labels) or 0.0)


def test_transient_failure_is_retried_after_the_backoff_then_delivered(
    make_outbox: Callable[..., SqliteOutbox], clock: Clock, tmp_path: Path
) -> None:
    box, audit_file = make_outbox(), tmp_path / "audit.jsonl"
    audit = AuditLog(audit_file, logger_name="test.outbox.audit")
    fake = FakeDeliverer(DeliveryFailed("no answer", permanent=False), None)
    s = sender(box, fake, clock, audit)
    retried = counter("lesionserve_outbox_retries_total", destination="dimse")
    delivered = counter("lesionserve_outbox_delivered_total", destination="dimse")
    s.enqueue([letter(1)])
    assert s.run_once() == 1
    (row,) = box.letters("pending")
    assert row.attempts == 1 and row.error == "no answer"
    assert clock.now + 1.0 <= row.next_at <= clock.now + 2.0  # first delay: base 2 s, jittered to [1, 2]
    assert s.run_once() == 0  # not due yet
    clock.now = row.next_at
    assert s.run_once() == 1 and box.stats().pending == 0
    assert fake.seen == ["2.25.1", "2.25.1"]
    assert counter("lesionserve_outbox_retries_total", destination="dimse") == retried + 1
    assert counter("lesionserve_outbox_delivered_total", destination="dimse") == delivered + 1
    audit.close()
    lines = [json.loads(x) for x in audit_file.read_text().splitlines()]
    assert [x["channel"]["result"] for x in lines] == ["retry", "delivered"]
    assert [x["channel"]["attempt"] for x in lines] == ["1", "2"]
    assert lines[0]["request_id"] == "request-1" and lines[0]["channel"]["reason"] == "no answer"
    assert lines[0]["dicom"]["SOPInstanceUID"] != "2.25.1" and len(lines[0]["dicom"]["SOPInstanceUID"]) == 64
    assert PATIENT not in audit_file.read_text()  # an attempt's line names no patient


@pytest.mark.parametrize(
    ("failures", "advance_s", "reason"),
    [
        ([DeliveryFailed("0x0122", permanent=True)], 0.0, "refused"),
        ([DeliveryFailed("down", permanent=False)] * 5, 61.0, "attempts"),
        ([DeliveryFailed("down", permanent=False)] * 2, 3600.0, "age"),
    ],
)
def test_dead_letter_reasons(
    make_outbox: Callable[..., SqliteOutbox],
    clock: Clock,
    failures: list[DeliveryFailed],
    advance_s: float,
    reason: str,
) -> None:
    box = make_outbox()
    fake = FakeDeliverer(*failures)
    s = sender(box, fake, clock)
    before = counter("lesionserve_outbox_dead_lettered_total", reason=reason)
    s.enqueue([letter(1)])
    for _ in range(len(failures)):
        s.run_once()
        clock.now += advance_s
    (dead,) = box.letters("dead")
    assert dead.reason == reason and dead.attempts == len(failures) and dead.error == failures[-1].reason
    assert counter("lesionserve_outbox_dead_lettered_total", reason=reason) == before + 1
    assert counter("lesionserve_outbox_dead_letters") == 1 and counter("lesionserve_outbox_pending") == 0
    s.run_once()
    assert len(fake.seen) == len(failures)  # a dead letter is not tried again until an operator says so


def test_oldest_pending_age_gauge_reads_the_clock(make_outbox: Callable[..., SqliteOutbox], clock: Clock) -> None:
    box = make_outbox()
    s = sender(box, FakeDeliverer(DeliveryFailed("down", permanent=False)), clock)
    s.enqueue([letter(1)])
    clock.now += 42.0
    assert counter("lesionserve_outbox_oldest_pending_age_seconds") == 42.0
    assert counter("lesionserve_outbox_pending") == 1
    s.run_once()
    clock.now += 1e6
    s.run_once()  # the second failure is past max_age: a dead letter
    assert counter("lesionserve_outbox_oldest_pending_age_seconds") == 0.0


def test_a_kind_without_a_deliverer_waits_instead_of_being_lost(
    make_outbox: Callable[..., SqliteOutbox], clock: Clock
) -> None:
    box = make_outbox()
    s = sender(box, FakeDeliverer(), clock)
    s.enqueue([letter(1, kind="stow-rs")])  # written when DICOMWEB_PUSH_SR was on; it is off after a restart
    s.run_once()
    (row,) = box.letters("pending")
    assert row.attempts == 1 and "no stow-rs destination" in (row.error or "")


def test_the_operators_command_line(tmp_path: Path, clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    from service.hospital.outbox_cli import main

    path = tmp_path / "outbox.sqlite"
    box = SqliteOutbox(path, max_items=10, max_bytes=1 << 20, clock=clock)
    box.put([letter(1), letter(2)])
    one, _ = box.due(clock.now, 10)
    box.dead(one.id, clock.now, "refused", "the PACS answered 0x0122")
    assert main([str(path), "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["dead"] == 1
    assert main([str(path), "list"]) == 0
    (shown,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (shown["id"], shown["reason"]) == (one.id, "refused") and "payload" not in shown
    assert PATIENT not in json.dumps(shown)
    assert main([str(path), "backup", str(tmp_path / "copy.sqlite")]) == 0  # while the service has it open
    assert stat.S_IMODE((tmp_path / "copy.sqlite").stat().st_mode) == 0o600
    copy = SqliteOutbox(tmp_path / "copy.sqlite", max_items=10, max_bytes=1 << 20)
    assert (copy.stats().pending, copy.stats().dead) == (1, 1)
    copy.close()
    assert main([str(path), "retry", "--id", str(one.id)]) == 0
    assert box.stats().dead == 0 and box.stats().pending == 2
    assert main([str(path), "drop", "--all"]) == 0 and box.stats().pending == 2  # pending: never dropped
    capsys.readouterr()
    assert main([str(tmp_path / "typo.sqlite"), "stats"]) == 2 and not (tmp_path / "typo.sqlite").exists()
    assert "does not exist" in capsys.readouterr().err
    box.close()


class RaisingDeliverer:
    """A deliverer with a fault of its own: it raises on the first letter it is given."""

    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, letters: Sequence[Row]) -> Iterator[DeliveryFailed | None]:
        self.calls += 1
        raise ValueError("an answer it could not parse")
        yield None  # a generator, as the real ones


def test_a_fault_in_the_deliverer_counts_one_attempt_and_leaves_the_rest_due(
    make_outbox: Callable[..., SqliteOutbox], clock: Clock
) -> None:
    box = make_outbox()
    s = OutboxSender(box, {"dimse": RaisingDeliverer()}, POLICY, clock=clock, rng=random.Random(3))
    s.enqueue([letter(1), letter(2)])
    assert s.run_once() == 2
    first, second = box.letters("pending")
    assert (first.attempts, first.error) == (1, "delivery failed (ValueError)") and first.next_at > clock.now
    assert (second.attempts, second.error) == (0, None) and second.next_at <= clock.now  # untouched, due
