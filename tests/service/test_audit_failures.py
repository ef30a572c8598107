"""The audit trail when its file moves, fills up or cannot be opened; refusals that must be audited; the head cap
(issue 28, findings 9, 15 and 16). Through the HTTP entry; the start-up refusal and the head cap through a real
process and socket."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import jpeg_bytes, post_image
from tests.service.test_dicomweb import DICOMS, stow
from tests.service.test_dimse import metric
from tests.service.test_lifecycle import served
from tests.service.test_main import assert_one_line_refusal, run_service
from tests.service.test_slow_clients import problem_of, read_answer

FAILURES = "lesionserve_audit_write_failures_total"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_audit_follows_logrotate(client_factory: Callable[..., TestClient], tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit))
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]
    audit.rename(tmp_path / "audit.jsonl.1")  # logrotate: move, then the service writes a new file
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]
    assert len(lines(tmp_path / "audit.jsonl.1")) == 1
    assert len(lines(audit)) == 1  # old code: no new file, the line went to the moved one


@pytest.fixture
def full_disk(tmp_path: Path) -> Path:
    """An audit path whose writes fail with ENOSPC (a link to /dev/full), as on a full disk."""
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    return path


def heal(path: Path) -> None:
    """The disk has room again: the path is a plain file (the handler reopens it: another inode)."""
    path.unlink()
    path.touch()


def test_full_disk_fail_open_counts_logs_one_line_and_keeps_the_lines(
    client_factory: Callable[..., TestClient], full_disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    client = client_factory(audit_log=str(full_disk))
    before = metric(client, FAILURES)
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]  # fail-open: answered
    assert metric(client, FAILURES) == before + 1
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err  # old code: 45 lines of traceback per line lost
    heal(full_disk)
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]
    assert [x["outcome"]["status"] for x in lines(full_disk)] == [200, 200]  # the kept line, then the new one


def test_full_disk_fail_closed_refuses_new_work_until_the_lines_are_written(
    client_factory: Callable[..., TestClient], full_disk: Path
) -> None:
    client = client_factory(audit_log=str(full_disk), audit_on_failure="closed")
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]  # its line fails after
    refused = post_image(client, jpeg_bytes())
    assert refused.status_code == 503 and refused.json()["type"].endswith("/audit-not-writable")  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 503
    heal(full_disk)
    assert client.get("/readyz").status_code == 200
    assert post_image(client, jpeg_bytes()).status_code == 200  # type: ignore[attr-defined]
    assert [x["outcome"]["status"] for x in lines(full_disk)] == [200, 503, 200]  # nothing lost, in order


def test_refused_stow_wado_and_admin_calls_are_audited(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(
        audit_log=str(audit), api_keys="app:0123456789abcdef0123,ops:fedcba9876543210fedc", admin_key_ids="ops",
        dicomweb_enabled=True, dicomweb_origin="http://127.0.0.1:9/dicom-web",
    )  # fmt: skip
    assert stow(client, [("application/dicom", DICOMS[0].read_bytes())]).status_code == 401
    uids = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.4", "sop_instance_uid": "1.2.5"}
    assert client.post("/v1/classify/dicomweb", json=uids).status_code == 401
    app_key = {"authorization": "Bearer 0123456789abcdef0123"}
    assert client.post("/v1/admin/models/reload", json={}, headers=app_key).status_code == 403
    got = [(x["outcome"]["status"], x.get("key_id")) for x in lines(audit)]
    assert got == [(401, None), (401, None), (403, "app")]  # old code: no line at all


def test_unwritable_audit_folder_is_one_line_and_exit_2(tiny_onnx: Path) -> None:
    proc = run_service({
        "LESIONSERVE_MODEL_PATH": str(tiny_onnx), "LESIONSERVE_PROVIDERS": "CPUExecutionProvider",
        "LESIONSERVE_AUDIT_LOG": "/proc/lesionserve-audit.jsonl",  # a folder no one may create files in, root too
    })  # fmt: skip
    assert_one_line_refusal(proc, "cannot open the audit log /proc/lesionserve-audit.jsonl")


def test_a_complete_head_over_the_cap_is_400_and_closed(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, max_header_bytes="16384") as server:
        port = int(server.base.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 65_000 + b"\r\n\r\n"
        sock.sendall(head)  # whole, in one write: h11 never sees it incomplete
        status, headers, body = problem_of(read_answer(sock))
        sock.close()
    assert status == 400 and headers["connection"] == "close"  # old code: 200
    assert "limit is 16384" in str(body["detail"]) and os.path.exists(server.log)
