"""SIGTERM with hospital work in flight (issue 28, findings 4, 6 and 11), on the real ``python -m service`` process:
a pynetdicom sender whose C-STORE is being classified, and a PACS that does not answer the SR's C-STORE."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from service.hospital.outbox import SqliteOutbox
from tests.service.test_dimse import DEST_AET, DICOMS, SCU_AET, SrSink, send
from tests.service.test_lifecycle import free_port, served


class SlowPacs(SrSink):
    """A PACS whose SR C-STOREs hang until released (a PACS that stopped answering mid-transfer)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def _store(self, event: Any) -> int:
        self.entered.set()
        self.release.wait(60)
        return super()._store(event)

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture
def slow_pacs() -> Iterator[SlowPacs]:
    pacs = SlowPacs()
    yield pacs
    pacs.close()


def test_sigterm_drains_c_stores_and_aborts_a_hung_sr_delivery_within_the_grace(
    tmp_path: Path, tiny_onnx: Path, slow_pacs: SlowPacs
) -> None:
    port, audit, box = free_port(), tmp_path / "audit.jsonl", tmp_path / "outbox.sqlite"
    settings = {
        "dimse_enabled": "true", "dimse_host": "127.0.0.1", "dimse_port": str(port), "dimse_allowed_aets": SCU_AET,
        "dimse_destination": f"{DEST_AET}@127.0.0.1:{slow_pacs.port}", "dimse_timeout_s": "30",
        "outbox_path": str(box), "audit_log": str(audit), "shutdown_grace_s": "3",
    }  # fmt: skip
    with served(tmp_path, tiny_onnx, **settings) as server:
        (first,) = send(port, [pydicom.dcmread(DICOMS[0])])
        assert int(first.Status) == 0x0000  # its SR is in the outbox; the sender is now stuck at the slow PACS
        assert slow_pacs.entered.wait(30)
        server.hold.touch()  # the next C-STORE stays inside the model until the hold file goes
        before = server.runs_entered()
        answers: list[Dataset] = []
        sender = threading.Thread(target=lambda: answers.extend(send(port, [pydicom.dcmread(DICOMS[1])])))
        sender.start()
        server.wait_until("the C-STORE inside the model", lambda: server.runs_entered() > before)
        server.proc.send_signal(signal.SIGTERM)
        server.hold.unlink()
        code = server.exit_code(within=20)  # old code: the outbox waited DIMSE_TIMEOUT_S + 5 s for the PACS
        sender.join(30)
        output = server.output()
    assert code == 0, output
    assert [int(a.Status) for a in answers] == [0x0000]  # the C-STORE admitted before SIGTERM got its answer
    assert "Traceback" not in output
    lines = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    stores = [x for x in lines if "dimse_status" in x.get("channel", {})]
    assert [(x["channel"]["dimse_status"], x["channel"]["sr"]) for x in stores] == [("0x0000", "queued")] * 2
    (attempt,) = [x for x in lines if x.get("channel", {}).get("entry") == "outbox"]
    assert attempt["channel"]["result"] == "retry" and "aborted at shutdown" in attempt["channel"]["reason"]
    outbox = SqliteOutbox(box, max_items=10, max_bytes=1 << 26)
    try:
        assert outbox.stats().pending == 2  # both SRs go out after the next start (the same SR UIDs)
    finally:
        outbox.close()
