"""Optional API keys: ``Authorization: Bearer <key>``, compared in constant time.

Keys come from settings (env or a file, see :class:`service.config.Settings`). Only the key
id is ever stored on the request or logged. With no keys configured, auth is off.
"""

from __future__ import annotations

import hmac

from service.errors import Unauthorized

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="lesionserve"'}


class ApiKeys:
    """Key id -> key table.

    Args:
        table: key id -> key; empty disables authentication.
    """

    def __init__(self, table: dict[str, str]) -> None:
        self._table = [(key_id, key.encode()) for key_id, key in table.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._table)

    def identify(self, authorization: str | None) -> str | None:
        """The key id for an ``Authorization`` header; None when auth is off.

        Raises:
            Unauthorized: auth is on and the header is missing, not Bearer, or no key matches.
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
        return found
