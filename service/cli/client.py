"""The HTTP side of the client commands: one ``httpx.Client`` with the key, and calls that retry on 503."""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx

from service.config import ClientSettings

MAX_RETRY_AFTER_S = 30.0  # a server asking for longer is treated as down: the image gets an error row instead


def add_client_flags(parser: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """``--url``, ``--api-key``, ``--timeout-s``, the TLS files (and, for batch work, ``--concurrency --retries``)."""
    names = ["url", "api_key", "timeout_s", "ca_file", "client_cert_file", "client_key_file",
             *(["concurrency", "retries"] if batch else [])]  # fmt: skip
    for name in names:
        info = ClientSettings.model_fields[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{info.description} Default: {info.default!r}; env LESIONSERVE_{name.upper()}.",
        )


def client_settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(**{n: getattr(args, n) for n in ClientSettings.model_fields if hasattr(args, n)})


def open_client(settings: ClientSettings) -> httpx.Client:
    headers = {"authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    tls = settings.ssl_context()
    return httpx.Client(base_url=settings.url, headers=headers, timeout=settings.timeout_s, limits=limits,
                        verify=tls if tls is not None else True)  # fmt: skip


def retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "1")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return 1.0


def send(client: httpx.Client, method: str, path: str, retries: int, **kwargs: Any) -> httpx.Response:
    """One request; a 503 is retried after its ``Retry-After``, a refused connection after 1 s, ``retries`` times.

    Raises:
        httpx.TransportError: still no connection after the retries.
    """
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            response = client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            if last:
                raise
            time.sleep(1.0)
            continue
        if response.status_code != 503 or last:
            return response
        time.sleep(retry_after(response))
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


class ServerError(Exception):
    """No usable answer from the server; ``exit_code`` 2 when unreachable, 1 when it answered an error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def get_models(client: httpx.Client, settings: ClientSettings, retries: int) -> dict[str, Any]:
    """The server's ``/v1/models`` answer (raises :class:`ServerError`)."""
    try:
        response = send(client, "GET", "/v1/models", retries)
    except httpx.TransportError as exc:
        raise ServerError(f"cannot reach {settings.url}: {exc}", 2) from None
    if response.status_code != 200:
        raise ServerError(f"{settings.url}/v1/models answered {detail(response)}", 1)
    answer: dict[str, Any] = response.json()
    return answer


def detail(response: httpx.Response) -> str:
    """The server's reason for an error answer (problem+json ``detail``, OIP ``error``), else its status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "error"):
            if isinstance(body.get(key), str):
                return f"{response.status_code}: {body[key]}"
    return f"{response.status_code}: {response.reason_phrase}"
