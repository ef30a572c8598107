"""A model swap on a real ``python -m service`` process under concurrent load: no request fails, answers move
to the new file's sha256 and never back, and bad files are refused while the serving model answers on.

Triggers: ``POST /v1/admin/models/reload`` with a path, then SIGHUP after the file was replaced by a rename.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.deploy.conftest import stop_process
from tests.service.conftest import jpeg_bytes
from tests.service.test_lifecycle import free_port
from tests.service.test_swap import (
    ADMIN,
    KEYS,
    RELOAD,
    USER_KEY,
    batch_of_one_only,
    model_no_worse,
    model_v,
    replace_atomically,
    sha,
    wait_for,
)
from tests.tiny_model import HAM_CLASSES

CLIENTS = 8


@dataclass
class Client:
    """One caller sending classify requests back to back; what each got, in order."""

    answers: list[str | int] = field(default_factory=list)  # the answer's model sha256, or a failure's status/error

    def count(self, sha256: str) -> int:
        return self.answers.count(sha256)


@contextmanager
def serving(models: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(
        LESIONSERVE_MODEL_PATH=str(models / "a.onnx"), LESIONSERVE_HOST="127.0.0.1", LESIONSERVE_PORT=str(port),
        LESIONSERVE_PROVIDERS="CPUExecutionProvider", LESIONSERVE_MAX_BATCH_SIZE="4", LESIONSERVE_INTRA_OP_THREADS="1",
        LESIONSERVE_LOG_FORMAT="json", LESIONSERVE_AUDIT_LOG="off", LESIONSERVE_API_KEYS=KEYS,
        LESIONSERVE_ADMIN_KEY_IDS="ops",
    )  # fmt: skip
    with log.open("w") as log_file:  # a file, not a pipe: an unread pipe fills and blocks the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "readiness", timeout=60)
        yield base, proc
        assert proc.poll() is None, log.read_text()
    finally:
        stop_process(proc, timeout=20)


@pytest.mark.slow
def test_swaps_under_concurrent_load_fail_no_request_and_answers_follow_the_new_file(tmp_path: Path) -> None:
    models = tmp_path / "models"
    a = model_v(models / "a.onnx", "1.0.0", 1)
    b = model_no_worse(models / "b.onnx", "2.0.0", than=a, seeds=range(2, 40))
    c = model_no_worse(tmp_path / "c.onnx", "3.0.0", than=b, seeds=range(40, 80))  # SIGHUP sends no force
    order = [sha(a), sha(b), sha(c)]
    log = tmp_path / "server.log"
    clients = [Client() for _ in range(CLIENTS)]
    stop = threading.Event()

    def load(me: Client, base: str) -> None:
        with httpx.Client(base_url=base, timeout=30, headers={"authorization": f"Bearer {USER_KEY}"}) as http:
            while not stop.is_set():
                try:
                    resp = http.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
                    me.answers.append(resp.json()["model"]["sha256"] if resp.status_code == 200 else resp.status_code)
                except httpx.TransportError as exc:
                    me.answers.append(type(exc).__name__)

    with serving(models, log) as (base, proc):
        threads = [threading.Thread(target=load, args=(me, base)) for me in clients]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: all(me.count(order[0]) >= 5 for me in clients), "every client answered by a")
            swap = httpx.post(f"{base}{RELOAD}", json={"path": "b.onnx"}, headers=ADMIN, timeout=60)
            assert swap.status_code == 200, swap.text
            wait_for(lambda: all(me.count(order[1]) >= 5 for me in clients), "every client answered by b")
            replace_atomically(c, models / "b.onnx")  # the served file is replaced, then SIGHUP re-reads it
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: all(me.count(order[2]) >= 5 for me in clients), "every client answered by c")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        # refused while under no load: each names its check; c answers on
        for make, check in [
            (lambda p: p.write_bytes(b"\x08\x01 truncated protobuf") and p, "load"),
            (lambda p: model_v(p, "4.0.0", 4, classes=HAM_CLASSES[:4]), "contract"),
            (batch_of_one_only, "warm_up"),
        ]:
            make(models / f"{check}.onnx")
            resp = httpx.post(f"{base}{RELOAD}", json={"path": f"{check}.onnx"}, headers=ADMIN, timeout=60)
            assert (resp.status_code, resp.json()["check"]) == (422, check), resp.text
            answer = httpx.post(
                f"{base}/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg", **ADMIN}, timeout=30
            )
            assert answer.status_code == 200 and answer.json()["model"]["sha256"] == order[2]
    output = log.read_text()
    for me in clients:
        failures = [x for x in me.answers if x not in order]
        assert failures == [], failures  # no request failed during either swap
        ranks = [order.index(x) for x in me.answers]
        assert ranks == sorted(ranks), "a client got an answer from a model that had been swapped out"
    assert '"trigger": "sighup"' in output and '"trigger": "api"' in output
    assert all(min(me.count(x) for x in order) >= 5 for me in clients)  # every client met all three models


@pytest.mark.slow
def test_the_swapped_out_session_is_freed_without_waiting_for_the_cyclic_garbage_collector(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's request scopes sit in reference cycles: nothing of a request may keep the old session alive.

    A real uvicorn server (h11, as ``python -m service`` runs it) in this process, with the cyclic collector
    off: the old model must be freed by reference counting alone once its requests are answered.
    """
    import gc

    import uvicorn

    from service.app import create_app
    from service.config import Settings

    models = tmp_path / "models"
    model_no_worse(models / "b.onnx", "2.0.0", than=model_v(models / "a.onnx", "1.0.0", 1), seeds=range(2, 40))
    settings = Settings(
        model_path=models / "a.onnx", providers="CPUExecutionProvider", log_format="text", api_keys=KEYS,
        admin_key_ids="ops", audit_log="off",
    )  # type: ignore[call-arg]  # fmt: skip
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, http="h11", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def send(n: int) -> None:
        with httpx.Client(base_url=base, headers=ADMIN, timeout=30) as http:
            for _ in range(n):
                resp = http.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
                assert resp.status_code == 200

    gc.collect()
    gc.disable()
    try:
        wait_for(lambda: _ready(base), "readiness", timeout=60)
        clients = [threading.Thread(target=send, args=(10,)) for _ in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        with caplog.at_level(logging.INFO, logger="service.swap.reloader"):
            assert httpx.post(f"{base}{RELOAD}", json={"path": "b.onnx"}, headers=ADMIN, timeout=60).status_code == 200
            send(2)  # the worker runs a batch of the new model: nothing of the old one is left in it
            released = [r for r in caplog.records if r.getMessage() == "previous model released"]
        assert len(released) == 1, "the old session is kept alive by a reference cycle"
    finally:
        gc.enable()
        server.should_exit = True
        thread.join(30)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
