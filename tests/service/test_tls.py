"""HTTPS in the server itself (issue 31): a real ``lesionserve serve`` process, httpx and ``ssl`` clients, a CA made
in the test; mutual TLS, TLS 1.2+ only, plain text refused, the certificate reloaded on SIGHUP on the same
listener; the warning line when authentication is off on a non-loopback address; no ANSI codes in its log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from service.config import Settings
from service.tls import TlsError, server_context
from tests.conftest import REPO
from tests.service.pki import TestCa, encrypted_key
from tests.service.test_lifecycle import free_port

pytestmark = pytest.mark.slow


# root reads a mode-000 file anyway: the "unreadable key" case runs without the capabilities that allow it
WITHOUT_FILE_OVERRIDE = (
    ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if os.geteuid() == 0 and shutil.which("setpriv")
    else []
)


def serve_args(model: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--providers", "CPUExecutionProvider", "--audit-log", "off", *flags]  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LESIONSERVE_", "OTEL_"))}
    return {**env, **extra}


def wait_until(what: str, condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    until = time.monotonic() + 90  # a hang fails the test instead of the suite; no timing is asserted
    while not condition():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < until, f"never: {what}\n{log.read_text()}"
        time.sleep(0.05)


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def served_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate a fresh TLS connection is given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(*client_pair(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def client_pair(ca: Path) -> tuple[str, str]:
    return str(ca.parent / "client.crt"), str(ca.parent / "client.key")


def ready(url: str, **kw: object) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2, **kw).status_code == 200  # type: ignore[arg-type]
        except httpx.TransportError:
            return False

    return check


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")  # the old versions are the point
def test_https_with_mutual_tls_refuses_plain_text_and_old_tls_and_reloads_on_sighup(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    ca = TestCa(tmp_path)
    first = ca.issue("server")
    ca.issue("client", server=False)
    stranger = TestCa(tmp_path, "stranger").issue("stranger-client", server=False)  # signed by another CA
    port, log = free_port(), tmp_path / "server.log"
    args = serve_args(tiny_onnx, port, "--host", "0.0.0.0", "--tls-cert-file", str(first.cert), "--tls-key-file",
                      str(first.key), "--tls-client-ca-file", str(ca.pem), "--tls-client-cert", "required")  # fmt: skip
    base = f"https://127.0.0.1:{port}"
    mutual = ssl.create_default_context(cafile=str(ca.pem))
    mutual.load_cert_chain(*client_pair(ca.pem))
    with process(args, log) as proc:
        wait_until("ready over HTTPS", ready(f"{base}/readyz", verify=mutual), proc, log)
        with httpx.Client(verify=mutual) as client:  # one keep-alive connection across the reload below
            assert client.get(f"{base}/healthz").status_code == 200
            anonymous = ssl.create_default_context(cafile=str(ca.pem))  # verifies the server, sends no certificate
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{base}/healthz", verify=anonymous).raise_for_status()
            strangers = ssl.create_default_context(cafile=str(ca.pem))
            strangers.load_cert_chain(str(stranger.cert), str(stranger.key))
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{base}/healthz", verify=strangers).raise_for_status()
            with pytest.raises(httpx.TransportError):  # plain HTTP on the HTTPS port: no answer, connection closed
                httpx.get(f"http://127.0.0.1:{port}/healthz")
            old = ssl.create_default_context(cafile=str(ca.pem))
            old.load_cert_chain(*client_pair(ca.pem))
            old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
            old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.0/1.1 at all
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{base}/healthz", verify=old)
            assert served_serial(port, ca.pem) == first.serial

            # Rotation: new files at the same paths, SIGHUP; the listener stays, new handshakes get the new one.
            second = ca.issue("server")
            assert second.cert == first.cert and second.serial != first.serial
            proc.send_signal(signal.SIGHUP)
            wait_until("the new certificate", lambda: served_serial(port, ca.pem) == second.serial, proc, log)
            assert client.get(f"{base}/healthz").status_code == 200  # the connection made before still answers

            # A broken file on reload: the one in use stays, and the log says why.
            first.key.write_text("not a key")
            proc.send_signal(signal.SIGHUP)
            wait_until("the failed reload logged", lambda: "reload failed" in log.read_text(), proc, log)
            assert served_serial(port, ca.pem) == second.serial
            assert httpx.get(f"{base}/readyz", verify=mutual).status_code == 200
        # The project's own client, with the CA and a client certificate (and refused without the certificate).
        health = subprocess.run([sys.executable, "-m", "service.cli", "health", "--url", base, "--ca-file", str(ca.pem),
                                 "--client-cert-file", client_pair(ca.pem)[0], "--client-key-file",
                                 client_pair(ca.pem)[1]], cwd=REPO, env=clean_env(), capture_output=True, text=True)  # fmt: skip
        assert health.returncode == 0 and "ready=ready" in health.stdout, health.stdout + health.stderr
        anonymous_cli = subprocess.run([sys.executable, "-m", "service.cli", "health", "--url", base, "--ca-file",
                                        str(ca.pem)], cwd=REPO, env=clean_env(), capture_output=True, text=True)  # fmt: skip
        assert anonymous_cli.returncode == 2 and "unreachable" in anonymous_cli.stdout
    text = log.read_text()
    assert "authentication is off on a non-loopback address" in text  # 0.0.0.0 without API keys
    assert "\x1b" not in text  # uvicorn's colour codes never reach the log
    assert "Traceback" not in text


def test_the_warning_is_not_given_on_loopback_and_optional_client_certificates(tiny_onnx: Path, tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    pair = ca.issue("server")
    ca.issue("client", server=False)
    port, log = free_port(), tmp_path / "server.log"
    args = serve_args(tiny_onnx, port, "--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
                      "--tls-client-ca-file", str(ca.pem), "--tls-client-cert", "optional", "--log-format", "json")  # fmt: skip
    anonymous = ssl.create_default_context(cafile=str(ca.pem))
    with process(args, log) as proc:
        wait_until("ready", ready(f"https://127.0.0.1:{port}/readyz", verify=anonymous), proc, log)
        mutual = ssl.create_default_context(cafile=str(ca.pem))
        mutual.load_cert_chain(*client_pair(ca.pem))
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=mutual).status_code == 200
        with pytest.raises(httpx.ConnectError):  # the server's certificate is not trusted without the CA
            httpx.get(f"https://127.0.0.1:{port}/healthz")
    text = log.read_text()
    assert "authentication is off" not in text
    assert "\x1b" not in text and "color_message" not in text


# --- start-up refusals: one line, exit 2, never a traceback or an abort ----------------------------------------------


def test_start_up_refusals_print_one_line_and_exit_2(tiny_onnx: Path, tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    good = ca.issue("server")
    other = ca.issue("other")
    not_pem = tmp_path / "garbage.crt"
    not_pem.write_bytes(os.urandom(64) + b"\xff")
    text_not_cert = tmp_path / "text.crt"
    text_not_cert.write_text("hello\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(good.key.read_bytes())
    unreadable.chmod(0)
    outbox = tmp_path / "outbox.sqlite"
    dimse = ["--dimse-enabled", "true", "--dimse-allowed-aets", "SCU", "--dimse-destination", "PACS@127.0.0.1:4242",
             "--outbox-path", str(outbox), "--dimse-host", "127.0.0.1"]  # fmt: skip
    cases: dict[str, tuple[list[str], str]] = {
        "port in use": ([], f"cannot listen on 127.0.0.1:{busy} (LESIONSERVE_PORT): the address is already in use"),
        "DICOM port in use": ([*dimse, "--dimse-port", str(busy)], "(LESIONSERVE_DIMSE_PORT): the address is already"),
        "certificate not PEM": (["--tls-cert-file", str(not_pem), "--tls-key-file", str(good.key)],
                                "LESIONSERVE_TLS_CERT_FILE"),
        "no certificate in the file": (["--tls-cert-file", str(text_not_cert), "--tls-key-file", str(good.key)],
                                       "holds no PEM certificate"),
        "key not PEM": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(text_not_cert)],
                        "LESIONSERVE_TLS_KEY_FILE"),
        "encrypted key": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(encrypted_key(tmp_path / "enc.key"))],
                          "is an encrypted key"),
        "key of another certificate": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(other.key)],
                                       "cannot be used together"),
        "certificate without key": (["--tls-cert-file", str(good.cert)], "go together"),
        "unreadable key": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(unreadable)],
                           f"LESIONSERVE_TLS_KEY_FILE: cannot read {unreadable}: Permission denied"),
        "missing key file": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(tmp_path / "nope.key")],
                             "is not a file"),
        "client certificates without a CA": (["--tls-cert-file", str(good.cert), "--tls-key-file", str(good.key),
                                              "--tls-client-cert", "required"], "needs LESIONSERVE_TLS_CLIENT_CA_FILE"),
        "bad client certificate mode": (["--tls-client-cert", "sometimes"], "LESIONSERVE_TLS_CLIENT_CERT"),
        "DICOM TLS key that does not match": ([*dimse, "--dimse-port", str(free_port()), "--dimse-tls-cert-file",
                                               str(good.cert), "--dimse-tls-key-file", str(other.key),
                                               "--dimse-tls-ca-file", str(ca.pem)],
                                              "LESIONSERVE_DIMSE_TLS_CERT_FILE / LESIONSERVE_DIMSE_TLS_KEY_FILE"),
        "SR sender TLS without a CA": ([*dimse, "--dimse-destination-tls", "true"],
                                       "needs LESIONSERVE_DIMSE_TLS_CA_FILE"),
    }  # fmt: skip
    if os.geteuid() == 0 and not WITHOUT_FILE_OVERRIDE:  # root without setpriv: no way to make a file unreadable
        del cases["unreadable key"]
    procs = {}
    try:
        for name, (flags, _) in cases.items():  # all at once: each is an interpreter start, not a server
            port = busy if name == "port in use" else free_port()
            prefix = WITHOUT_FILE_OVERRIDE if name == "unreadable key" else []
            procs[name] = subprocess.Popen([*prefix, *serve_args(tiny_onnx, port, *flags)], cwd=REPO, env=clean_env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for name, (_, expected) in cases.items():
            _, err = procs[name].communicate(timeout=120)
            assert procs[name].returncode == 2, f"{name}: rc {procs[name].returncode}\n{err}"
            lines = [line for line in err.splitlines() if line.startswith("lesionserve:")]
            assert len(lines) == 1 and expected in lines[0], f"{name}: {err}"
            assert "Traceback" not in err and "terminate called" not in err and "\x1b" not in err, f"{name}: {err}"
    finally:
        taken.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()


# --- the context itself, in-process ---------------------------------------------------------------------------------


def test_contexts_are_tls_1_2_or_newer(tmp_path: Path) -> None:
    pair = TestCa(tmp_path).issue("server")
    ctx = server_context(pair.cert, pair.key, None, "none", "LESIONSERVE_TLS", "LESIONSERVE_TLS_CLIENT_CA_FILE")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE


def test_an_unreadable_key_names_the_setting(tmp_path: Path) -> None:
    pair = TestCa(tmp_path).issue("server")
    with pytest.raises(TlsError, match=r"LESIONSERVE_TLS_KEY_FILE: cannot read .*: Is a directory"):
        server_context(pair.cert, tmp_path, None, "none", "LESIONSERVE_TLS", "X")


def test_settings_refuse_a_ca_that_nothing_uses(tiny_onnx: Path, tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    pair = ca.issue("server")
    with pytest.raises(ValueError, match="CLIENT_CERT is none"):
        Settings(model_path=tiny_onnx, tls_cert_file=pair.cert, tls_key_file=pair.key, tls_client_ca_file=ca.pem)


def test_a_start_up_that_fails_after_the_model_loaded_exits_2_without_an_abort(tmp_path: Path) -> None:
    # The DICOM port taken between the entry point's check and the SCP's bind: the lifespan fails. Before the
    # warm-up moved after the entries' start, the exit found ONNX Runtime's threads running: exit 134.
    code = (
        "import sys, service.app as a\n"
        "def taken(*args, **kw): raise OSError(98, 'Address already in use')\n"
        "a.start_dicom_node = taken\n"
        "from service.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    flags = ["--dimse-enabled", "true", "--dimse-allowed-aets", "SCU", "--dimse-destination", "PACS@127.0.0.1:4242",
             "--outbox-path", str(tmp_path / "outbox.sqlite"), "--dimse-host", "127.0.0.1", "--dimse-port",
             str(free_port())]  # fmt: skip
    args = serve_args(REPO / "models" / "reference-int8.onnx", free_port(), *flags)  # a real model: its threads
    proc = subprocess.run([sys.executable, "-c", code, *args[3:]], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "terminate called" not in proc.stderr and "Traceback (most recent" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("lesionserve:")]
    assert "(LESIONSERVE_DIMSE_PORT): Address already in use" in line
