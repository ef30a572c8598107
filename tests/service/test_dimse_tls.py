"""DICOM TLS (issue 31): the Storage SCP with TLS and client certificates, against dcmtk's ``storescu +tls`` and
pynetdicom; the SR sent back over TLS to a PACS that checks the service's certificate; plain text refused."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

from tests.service.pki import TestCa
from tests.service.test_dimse import DEST_AET, DICOMS, SCP_AET, SCU_AET, audit_lines, scu, wait_for
from tests.service.test_lifecycle import free_port

STORESCU = shutil.which("storescu")


class TlsSink:
    """The PACS side of the SR return path, over TLS, requiring the sender's certificate (mutual TLS)."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.received: list[Dataset] = []
        self.port = free_port()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title=DEST_AET)
        ae.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])  # fmt: skip

    def _store(self, event: Any) -> int:
        self.received.append(event.dataset)
        return 0x0000


@pytest.fixture
def pki(tmp_path: Path) -> TestCa:
    ca = TestCa(tmp_path)
    for name in ("scp", "pacs"):
        ca.issue(name)
    ca.issue("modality", server=False)
    return ca


@pytest.fixture
def tls_node(
    client_factory: Callable[..., TestClient], pki: TestCa, tmp_path: Path
) -> Iterator[tuple[TestClient, int, TlsSink, Path]]:
    folder = pki.folder
    sink = TlsSink(folder / "pacs.crt", folder / "pacs.key", pki.pem)
    port, audit = free_port(), tmp_path / "audit.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{sink.port}", audit_log=str(audit), dimse_timeout_s=10,
        dimse_tls_cert_file=folder / "scp.crt", dimse_tls_key_file=folder / "scp.key", dimse_tls_ca_file=pki.pem,
        dimse_tls_client_cert="required", dimse_destination_tls=True,
    )  # fmt: skip
    yield client, port, sink, audit
    sink.server.shutdown()


def modality_tls(pki: TestCa, with_cert: bool = True) -> tuple[ssl.SSLContext, str]:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.pem))
    if with_cert:
        ctx.load_cert_chain(pki.folder / "modality.crt", pki.folder / "modality.key")
    return ctx, "127.0.0.1"


@pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu is not installed")
def test_dcmtk_storescu_over_tls_and_the_sr_goes_back_over_tls(
    tls_node: tuple[TestClient, int, TlsSink, Path], pki: TestCa
) -> None:
    _, port, sink, audit = tls_node
    folder = pki.folder
    sent = subprocess.run(
        [str(STORESCU), "+tls", str(folder / "modality.key"), str(folder / "modality.crt"), "+cf", str(pki.pem),
         "-xy", "-aet", SCU_AET, "-aec", SCP_AET, "127.0.0.1", str(port), str(DICOMS[0])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: len(sink.received) == 1, what="the SR delivered to the PACS over TLS")
    assert sink.received[0].SOPClassUID == ComprehensiveSRStorage
    stored = [line for line in audit_lines(audit) if line.get("channel", {}).get("dimse_status") == "0x0000"]
    assert len(stored) == 1


def test_plain_text_and_certificate_less_associations_are_refused(
    tls_node: tuple[TestClient, int, TlsSink, Path], pki: TestCa
) -> None:
    _, port, _, _ = tls_node
    plain = scu().associate("127.0.0.1", port, ae_title=SCP_AET)  # no TLS at all
    assert not plain.is_established
    anonymous = scu().associate("127.0.0.1", port, ae_title=SCP_AET, tls_args=modality_tls(pki, with_cert=False))
    assert not anonymous.is_established  # TLS, but no client certificate: required
    assoc = scu().associate("127.0.0.1", port, ae_title=SCP_AET, tls_args=modality_tls(pki))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_the_sr_sender_refuses_a_pacs_whose_certificate_it_cannot_verify(
    client_factory: Callable[..., TestClient], pki: TestCa, tmp_path: Path
) -> None:
    other = TestCa(tmp_path, "other")
    impostor = other.issue("impostor")
    sink = TlsSink(impostor.cert, impostor.key, pki.pem)  # a PACS certificate from a CA the service does not trust
    port, audit = free_port(), tmp_path / "audit.jsonl"
    try:
        client_factory(
            dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
            dimse_destination=f"{DEST_AET}@127.0.0.1:{sink.port}", audit_log=str(audit), dimse_timeout_s=10,
            dimse_tls_cert_file=pki.folder / "scp.crt", dimse_tls_key_file=pki.folder / "scp.key",
            dimse_tls_ca_file=pki.pem, dimse_destination_tls=True,
        )  # fmt: skip
        assoc = scu().associate("127.0.0.1", port, ae_title=SCP_AET, tls_args=modality_tls(pki))
        assert assoc.is_established

        assert assoc.send_c_store(pydicom.dcmread(DICOMS[0])).Status == 0x0000  # kept in the outbox
        assoc.release()

        def retried() -> bool:
            return any(x.get("channel", {}).get("result") == "retry" for x in audit_lines(audit))

        wait_for(retried, what="a failed delivery attempt")
        assert sink.received == []  # nothing went to a peer whose certificate failed
    finally:
        sink.server.shutdown()


def _served_serial(port: int, pki: TestCa) -> int:
    ctx, host = modality_tls(pki)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_scp_certificate_is_reloaded_on_the_same_listener(
    tls_node: tuple[TestClient, int, TlsSink, Path], pki: TestCa
) -> None:
    client, port, _, _ = tls_node
    first = _served_serial(port, pki)
    rotated = pki.issue("scp")  # new files at the same paths
    assert rotated.serial != first
    assert client.app.state.dimse_tls.reload()  # what SIGHUP runs (service.cli.serve)
    assert _served_serial(port, pki) == rotated.serial
    assoc = scu().associate("127.0.0.1", port, ae_title=SCP_AET, tls_args=modality_tls(pki))
    assert assoc.is_established
    assoc.release()
