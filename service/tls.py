"""TLS for the service's own listeners (HTTPS, the DICOM Storage SCP) and for the SR sender's associations.

Each context is built from certificate files named in the settings (``TLS_*`` for HTTPS, ``DIMSE_TLS_*`` for
DICOM), TLS 1.2 or newer only, with Python's default cipher list (no RC4, no 3DES, forward secrecy first).
A file that cannot be read or parsed stops the start with one line naming the file and the setting
(:class:`TlsError`), never a traceback.

Certificate rotation without dropping the listener: the listening socket keeps the context it was created
with; that context's SNI callback (which OpenSSL calls during every ClientHello, with or without a server
name) moves each new handshake onto the most recently loaded context. :meth:`ServerTls.reload` (SIGHUP)
builds a fresh context from the same files and swaps it in; a file that fails to load keeps the old one
serving and says why. Connections already open keep the certificate they were made with. The client
certificate mode (none / optional / required) is a setting, not a file, so it never changes on a reload.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from typing import Literal

from service.config import Settings

log = logging.getLogger(__name__)

ClientCertMode = Literal["none", "optional", "required"]
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsError(ValueError):
    """A TLS file or setting the service cannot use; the message is one line that names the file."""


def _read(path: Path, setting: str) -> str:
    """The file's text, or a TlsError that names the setting (a missing or unreadable file, not PEM text)."""
    try:
        return path.read_text(encoding="ascii")
    except OSError as exc:
        raise TlsError(f"{setting}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise TlsError(f"{setting}: {path} is not a PEM file (binary content; DER is not accepted)") from None


def _check_pem(path: Path, setting: str, kind: Literal["certificate", "key"]) -> None:
    """Refuse at start what OpenSSL would refuse with an obscure message, naming which file is wrong."""
    text = _read(path, setting)
    if kind == "certificate" and "-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(f"{setting}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if kind == "key":
        if "ENCRYPTED" in text:  # OpenSSL would otherwise ask for a passphrase on the terminal
            raise TlsError(f"{setting}: {path} is an encrypted key; give the service an unencrypted key file (0600)")
        if "PRIVATE KEY-----" not in text:
            raise TlsError(f"{setting}: {path} holds no PEM private key")


def _no_passphrase() -> str:
    raise TlsError("the key is encrypted")  # never a prompt on the terminal (see _check_pem)


def _openssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def server_context(
    cert: Path, key: Path, ca: Path | None, client_cert: ClientCertMode, prefix: str, ca_setting: str
) -> ssl.SSLContext:
    """A server-side context: TLS 1.2+, this certificate chain and key, client certificates per ``client_cert``.

    Args:
        cert: PEM certificate chain (the server's certificate first).
        key: its PEM private key, unencrypted.
        ca: PEM bundle of the CAs whose client certificates are accepted (needed unless ``client_cert`` is none).
        client_cert: ``none``, ``optional`` (verified when presented) or ``required`` (mutual TLS).
        prefix: the settings' name prefix (``LESIONSERVE_TLS`` or ``LESIONSERVE_DIMSE_TLS``), for messages.
        ca_setting: the name of the CA file's setting, for messages.

    Raises:
        TlsError: a file missing, unreadable, not PEM, encrypted, or a key that does not match the certificate.
    """
    _check_pem(cert, f"{prefix}_CERT_FILE", "certificate")
    _check_pem(key, f"{prefix}_KEY_FILE", "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise TlsError(
            f"{prefix}_CERT_FILE / {prefix}_KEY_FILE: {cert} and {key} cannot be used together ({_openssl_reason(exc)})"
        ) from None
    if client_cert != "none":
        _load_cas(ctx, ca, ca_setting)
        ctx.verify_mode = _VERIFY[client_cert]
    return ctx


def client_context(ca: Path, cert: Path | None, key: Path | None, prefix: str) -> ssl.SSLContext:
    """A client-side context that verifies the peer (certificate and host name) against ``ca``; presents
    ``cert``/``key`` when given (for a PACS that wants mutual TLS).

    Raises:
        TlsError: as :func:`server_context`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name; no system CAs:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # a PACS certificate comes from the hospital's own CA
    _load_cas(ctx, ca, f"{prefix}_CA_FILE")
    if cert is not None and key is not None:
        _check_pem(cert, f"{prefix}_CERT_FILE", "certificate")
        _check_pem(key, f"{prefix}_KEY_FILE", "key")
        try:
            ctx.load_cert_chain(cert, key, password=_no_passphrase)
        except ssl.SSLError as exc:
            raise TlsError(f"{prefix}_CERT_FILE / {prefix}_KEY_FILE: cannot be used ({_openssl_reason(exc)})") from None
    return ctx


def _load_cas(ctx: ssl.SSLContext, ca: Path | None, setting: str) -> None:
    if ca is None:
        raise TlsError(f"{setting} is needed to verify certificates")
    _check_pem(ca, setting, "certificate")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TlsError(f"{setting}: {ca} cannot be read as CA certificates ({_openssl_reason(exc)})") from None


class ServerTls:
    """The context a listener is created with, and the reload that swaps in new certificate files.

    Args:
        name: ``https`` or ``dicom``, for log lines.
        build: makes a fresh context from the files (raises :class:`TlsError`); called now and on each reload.
    """

    def __init__(self, name: str, build: _Builder) -> None:
        self.name, self._build = name, build
        self.context = build()  # the listener's; raises TlsError at start
        self._current = self.context
        self._lock = threading.Lock()
        self.context.sni_callback = self._switch

    def _switch(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        current = self._current  # one read: a reload may swap it in another thread
        if sslobj.context is not current:
            sslobj.context = current
        return None

    def reload(self) -> bool:
        """Load the files again and serve new handshakes with them; on failure keep the old ones (logged)."""
        with self._lock:  # two SIGHUPs in a row: one build at a time
            try:
                fresh = self._build()
            except TlsError as exc:
                log.error("TLS certificate reload failed; the previous certificate stays in use",
                          extra={"listener": self.name, "reason": str(exc)})  # fmt: skip
                return False
            self._current = fresh
        log.info("TLS certificate reloaded", extra={"listener": self.name})
        return True


class _Builder:  # a named callable, not a lambda: it appears in reload's log context and in tests
    def __init__(
        self, cert: Path, key: Path, ca: Path | None, client_cert: ClientCertMode, prefix: str, ca_setting: str
    ) -> None:
        self.args = (cert, key, ca, client_cert, prefix, ca_setting)

    def __call__(self) -> ssl.SSLContext:
        return server_context(*self.args)


def https_tls(settings: Settings) -> ServerTls | None:
    """The HTTPS listener's TLS (None: plain HTTP). Raises TlsError."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return ServerTls(
        "https",
        _Builder(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, settings.tls_client_cert,
                 "LESIONSERVE_TLS", "LESIONSERVE_TLS_CLIENT_CA_FILE"),
    )  # fmt: skip


def dimse_tls(settings: Settings) -> ServerTls | None:
    """The Storage SCP's TLS (None: plain DICOM). Raises TlsError."""
    if not settings.dimse_enabled or settings.dimse_tls_cert_file is None or settings.dimse_tls_key_file is None:
        return None
    return ServerTls(
        "dicom",
        _Builder(settings.dimse_tls_cert_file, settings.dimse_tls_key_file, settings.dimse_tls_ca_file,
                 settings.dimse_tls_client_cert, "LESIONSERVE_DIMSE_TLS", "LESIONSERVE_DIMSE_TLS_CA_FILE"),
    )  # fmt: skip


def sr_sender_tls(settings: Settings) -> ssl.SSLContext | None:
    """A fresh context for one association to ``DIMSE_DESTINATION`` (None: plain DICOM). Raises TlsError.

    Built per association, so that files rotated on disk are used from the next delivery pass on.
    """
    if not settings.dimse_destination_tls or settings.dimse_tls_ca_file is None:
        return None
    return client_context(
        settings.dimse_tls_ca_file, settings.dimse_tls_cert_file, settings.dimse_tls_key_file, "LESIONSERVE_DIMSE_TLS"
    )
