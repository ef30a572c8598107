"""Optional API keys: ``Authorization: Bearer <key>``, compared in constant time.

Keys come from settings (env or a file, see :class:`service.config.Settings`). Only the key
id is ever stored on the request or logged. With no keys configured, auth is off.
"""

from __future__ import annotations

import hmac

from service.errors import Forbidden, Unauthorized

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="lesionserve"'}


class ApiKeys:
    """Key id -> key table.

    Args:
        table: key id -> key; empty disables authentication.
        metrics_only: ids of keys limited to ``/metrics`` (a Prometheus scraper's key must not
            be able to classify images): anywhere else they get 403.
    """

    def __init__(self, table: dict[str, str], metrics_only: set[str] | None = None) -> None:
        self._table = [(key_id, key.encode()) for key_id, key in table.items()]
        self._metrics_only = frozenset(metrics_only or ())

    @property
    def enabled(self) -> bool:
        return bool(self._table)

    def identify(self, authorization: str | None, *, metrics: bool = False) -> str | None:
        """The key id for an ``Authorization`` header; None when auth is off.

        Args:
            authorization: the header's value.
            metrics: the request is for ``/metrics`` (where metrics-only keys are allowed).

        Raises:
            Unauthorized: auth is on and the header is missing, not Bearer, or no key matches (401).
            Forbidden: a valid key that is not allowed here (403).
        """
        if not self._table:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
        candidate = presented.strip().encode()
        found = None
        # Compare against every key without stopping early, so timing reveals neither the key
        # nor which entry matched.
        for key_id, key in self._table:
            if hmac.compare_digest(candidate, key) and found is None:
                found = key_id
        if found is None:
            raise Unauthorized("the API key is not valid", headers=_CHALLENGE)
        if found in self._metrics_only and not metrics:
            raise Forbidden(f"API key {found!r} may only read /metrics")
        return found
