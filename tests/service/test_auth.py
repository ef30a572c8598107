"""API keys: off by default, Bearer keys when set (env or file), health open, metrics by setting, no key in logs."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.auth import ApiKeys
from service.config import parse_api_keys
from service.errors import Unauthorized
from tests.service.conftest import jpeg_bytes

ClientFactory = Callable[..., TestClient]
KEY_A = "a" * 20 + "-secret-key-alpha"
KEY_B = "b" * 20 + "-secret-key-bravo"
KEY_C = "c" * 20 + "-secret-key-charlie"


def classify(client: TestClient, key: str | None = None) -> int:
    headers = {"content-type": "image/jpeg"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return client.post("/v1/classify", content=jpeg_bytes(), headers=headers).status_code


def test_auth_off_by_default(client_factory: ClientFactory) -> None:
    assert classify(client_factory()) == 200


def test_keys_from_env(client_factory: ClientFactory) -> None:
    client = client_factory(api_keys=f"ris:{KEY_A}, pacs:{KEY_B}")
    assert classify(client) == 401
    assert classify(client, "wrong-key-wrong-key-wrong") == 401
    assert classify(client, KEY_A) == 200 and classify(client, KEY_B) == 200
    no_bearer = client.post("/v1/classify", content=jpeg_bytes(), headers={"authorization": KEY_A})
    assert no_bearer.status_code == 401
    assert no_bearer.headers["www-authenticate"].startswith("Bearer")
    assert no_bearer.json()["type"].endswith("/unauthorized")
    assert no_bearer.json()["detail"] == "send an API key as 'Authorization: Bearer <key>'"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 200


@pytest.mark.parametrize("authorization", [f"Basic {KEY_A}", f"Token {KEY_A}", "Bearer ", "Bearer    ", ""])
def test_a_valid_key_under_another_scheme_or_no_key_is_refused(
    client_factory: ClientFactory, authorization: str
) -> None:
    client = client_factory(api_keys=f"ris:{KEY_A}")
    resp = client.post("/v1/classify", content=jpeg_bytes(), headers={"authorization": authorization})
    assert resp.status_code == 401
    assert resp.json()["detail"] == "send an API key as 'Authorization: Bearer <key>'"
    wrong = client.post("/v1/classify", content=jpeg_bytes(), headers={"authorization": f"Bearer {KEY_A}x"})
    assert (wrong.status_code, wrong.json()["detail"]) == (401, "the API key is not valid")
    for refused in (resp, wrong):  # RFC 6750: a 401 names the scheme it wants
        assert refused.headers["www-authenticate"] == 'Bearer realm="lesionserve"'


def test_keys_from_file(client_factory: ClientFactory, tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# issued 2026-01\nris:{KEY_A}\n\npacs:{KEY_B}\n")
    client = client_factory(api_keys_file=keyfile)
    assert classify(client) == 401 and classify(client, KEY_B) == 200


def test_health_open_and_metrics_by_setting(client_factory: ClientFactory) -> None:
    open_metrics = client_factory(api_keys=f"ris:{KEY_A}", metrics_auth=False)  # open only when said so
    assert open_metrics.get("/healthz").status_code == 200
    assert open_metrics.get("/readyz").status_code == 200
    assert open_metrics.get("/metrics").status_code == 200
    closed = client_factory(api_keys=f"ris:{KEY_A}", metrics_auth=True)
    assert closed.get("/metrics").status_code == 401
    assert closed.get("/metrics", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 200


def test_logs_carry_the_key_id_never_the_key(client_factory: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    client = client_factory(api_keys=f"ris:{KEY_A}")
    with caplog.at_level(logging.INFO):
        assert classify(client, KEY_A) == 200
        assert classify(client, "x" * 30) == 401
    access = [r for r in caplog.records if r.name == "service.access" and getattr(r, "route", "") == "/v1/classify"]
    assert [getattr(r, "key_id", None) for r in access] == ["ris", None]
    text = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    assert KEY_A not in text and "x" * 30 not in text


def test_identify_matches_exact_keys_only() -> None:
    keys = ApiKeys({"one": KEY_A, "two": KEY_B})
    assert keys.identify(f"Bearer {KEY_B}") == "two"
    assert keys.identify(f"bearer   {KEY_A}") == "one"
    for near_miss in (KEY_A[:-1], KEY_A + "x", KEY_A.upper(), f"{KEY_A} {KEY_B}"):
        with pytest.raises(Unauthorized):
            keys.identify(f"Bearer {near_miss}")
    assert ApiKeys({}).identify(None) is None


@pytest.mark.parametrize("presented", [KEY_A, KEY_B, KEY_C, "z" * 30], ids=["first", "middle", "last", "none"])
def test_every_key_is_compared_in_constant_time_whichever_matches(
    client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    # Timing itself is too noisy to assert in a test; what makes it independent of the key is
    # that every stored key goes through hmac.compare_digest, with no early stop at a match.
    client = client_factory(api_keys=f"ris:{KEY_A},pacs:{KEY_B},his:{KEY_C}")
    compared: list[bytes] = []
    constant_time = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert classify(client, presented) == (401 if presented.startswith("z") else 200)
    assert compared == [KEY_A.encode(), KEY_B.encode(), KEY_C.encode()]


@pytest.mark.parametrize(
    ("text", "message"),
    [("nocolon", "id:key"), ("a:short", "shorter than 16"), (f"a:{KEY_A},a:{KEY_B}", "twice"), (":" + KEY_A, "id:key")],
)
def test_malformed_keys_are_refused_without_echoing_them(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_api_keys(text, "LESIONSERVE_API_KEYS")
    assert KEY_A not in str(err.value)


def test_metrics_only_key_gets_403_elsewhere_and_reads_metrics(client_factory: ClientFactory) -> None:
    client = client_factory(api_keys=f"app:{KEY_A},scraper:{KEY_B}", metrics_only_key_ids="scraper", metrics_auth=True)
    assert classify(client, KEY_A) == 200
    refused = client.post("/v1/classify", content=jpeg_bytes(),
                          headers={"content-type": "image/jpeg", "authorization": f"Bearer {KEY_B}"})  # fmt: skip
    assert refused.status_code == 403 and refused.json()["type"].endswith("/forbidden")
    assert refused.json()["detail"] == "API key 'scraper' may only read /metrics"
    assert KEY_B not in refused.text
    assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY_B}"}).status_code == 403
    assert client.get("/metrics", headers={"authorization": f"Bearer {KEY_B}"}).status_code == 200
    assert client.get("/metrics", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 200
    assert client.get("/metrics").status_code == 401


def test_metrics_only_ids_must_name_existing_keys(settings_factory: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="do not exist: ghost"):
        settings_factory(api_keys=f"app:{KEY_A}", metrics_only_key_ids="ghost")
