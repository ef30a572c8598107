"""Model swap while serving (service/swap/): each check refuses its kind of bad file, the old model serving on.

In-process (TestClient); the swap under concurrent load on a real uvicorn process is in
``test_swap_process.py``. The files are tiny contract models (``tests/tiny_model.py``) and variants of
them that fail exactly one check: not ONNX (load), other classes (contract), a graph that only runs
batches of one (warm-up), a sigmoid where the softmax belongs (canary).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.batcher import Batcher, Pending, Target, by_target
from service.config import Settings
from service.errors import PROBLEM_BASE, ModelRejected
from service.inference import OnnxModel
from service.runtime import Runtime
from service.swap import checks
from tests.service.conftest import FakeModel, jpeg_bytes, wait_ready
from tests.tiny_model import HAM_CLASSES, contract_metadata, make_tiny_onnx

ADMIN_KEY, USER_KEY, SCRAPER_KEY = "admin-key-0123456789", "user-key-0123456789", "scrape-key-0123456789"
KEYS = f"ops:{ADMIN_KEY},ris:{USER_KEY},prom:{SCRAPER_KEY}"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
RELOAD = "/v1/admin/models/reload"


# --- model files that fail one check each -------------------------------------------------------------


def model_v(path: Path, version: str, seed: int, classes: list[str] | None = None, size: int = 32) -> Path:
    """A tiny contract model with its own weights (so its own sha256 and answers) and version."""
    classes = classes or HAM_CLASSES
    return make_tiny_onnx(
        path, size=size, classes=classes, seed=seed, metadata=contract_metadata(classes, size, version=version)
    )


def canary_right(path: Path) -> int:
    """How many bundled canary images the model at ``path`` gets right (what a reload compares)."""
    model = OnnxModel.load(path, ["CPUExecutionProvider"])
    size = model.metadata.input_size
    tops = checks.canary(Target(model.run, (size, size, 3)), model.metadata.classes)
    right = checks.canary_right(tops, model.metadata.classes)
    assert right is not None
    return right


def model_no_worse(path: Path, version: str, than: Path, seeds: range) -> Path:
    """A tiny model that gets at least as many canary images right as ``than``: a reload without force takes it.

    Random tiny models get 0 to 4 of them right; one that gets fewer than the serving model is refused
    (``checks.canary_right``), which is right for a real model and beside the point of a swap test.
    """
    floor = canary_right(than)
    for seed in seeds:
        if canary_right(model_v(path, version, seed)) >= floor:
            return path
    raise AssertionError(f"no seed in {seeds} gives a tiny model with {floor}+ canary images right")


def _rewire(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(src)
    edit(model)
    onnx.save(model, dst)
    return dst


def batch_of_one_only(path: Path, seed: int = 5) -> Path:
    """Loads and passes every contract check, but its graph reshapes the logits to one row: batch 2 fails."""
    src = model_v(path.with_suffix(".src.onnx"), "9.0.0", seed)

    def edit(model: onnx.ModelProto) -> None:
        softmax = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Softmax")
        model.graph.node[softmax].input[0] = "one_row"
        model.graph.node.insert(softmax, helper.make_node("Reshape", ["logits", "row_shape"], ["one_row"]))
        shape = np.array([1, len(HAM_CLASSES)], dtype=np.int64)
        model.graph.initializer.append(numpy_helper.from_array(shape, "row_shape"))

    return _rewire(src, path, edit)


def sigmoid_not_softmax(path: Path, seed: int = 6) -> Path:
    """Runs every batch shape, but its rows do not sum to 1: the canary check refuses it."""
    src = model_v(path.with_suffix(".src.onnx"), "9.1.0", seed)

    def edit(model: onnx.ModelProto) -> None:
        softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
        softmax.op_type = "Sigmoid"
        del softmax.attribute[:]

    return _rewire(src, path, edit)


def replace_atomically(content: Path, target: Path) -> None:
    """What an operator should do: write beside the served file, then rename over it."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(content.read_bytes())
    os.replace(tmp, target)


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    model_v(folder / "a.onnx", "1.0.0", seed=1)
    model_v(folder / "b.onnx", "2.0.0", seed=2)
    return folder


@pytest.fixture
def served_app(models_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """``make(**settings)``: a ready TestClient serving ``a.onnx`` with admin keys on."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        values: dict[str, object] = {
            "model_path": models_dir / "a.onnx", "providers": "CPUExecutionProvider", "log_format": "text",
            "api_keys": KEYS, "admin_key_ids": "ops", "metrics_only_key_ids": "prom", "max_batch_size": 4,
            "audit_log": "off",
        }  # fmt: skip
        values.update(overrides)
        client = TestClient(create_app(Settings(**values)), raise_server_exceptions=False)  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def sha(path: Path) -> str:
    return OnnxModel.load(path, ["CPUExecutionProvider"]).sha256


def classify(client: TestClient) -> dict[str, object]:
    resp = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg", **ADMIN})
    assert resp.status_code == 200, resp.text
    body: dict[str, object] = resp.json()
    return body


def served_sha(client: TestClient) -> str:
    model = classify(client)["model"]
    assert isinstance(model, dict)
    return str(model["sha256"])


def reloads(client: TestClient, result: str) -> float:
    text = client.get("/metrics", headers={"authorization": f"Bearer {SCRAPER_KEY}"}).text
    line = next(
        ln for ln in text.splitlines() if ln.startswith(f'lesionserve_model_reloads_total{{result="{result}"}}')
    )
    return float(line.split()[-1])


# --- the swap --------------------------------------------------------------------------------------------


def test_reload_switches_answers_metrics_and_models_to_the_new_file(
    served_app: Callable[..., TestClient], models_dir: Path
) -> None:
    client = served_app()
    assert served_sha(client) == sha(models_dir / "a.onnx")
    done = reloads(client, "success")  # the counter is per process: other tests' reloads are in it
    resp = client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["result"] == "success" and body["trigger"] == "api"
    assert {k: body["model"][k] for k in ("name", "version", "sha256")} == {
        "name": "tiny-test-model",
        "version": "2.0.0",
        "sha256": sha(models_dir / "b.onnx"),
    }
    assert body["previous"]["version"] == "1.0.0"
    assert body["canary"]["images"] == len(checks.canary_images()) == 4
    assert 0 <= body["canary"]["top_class_changed"] <= 4
    assert served_sha(client) == body["model"]["sha256"]
    assert client.get("/v1/models", headers=ADMIN).json()["models"][0]["version"] == "2.0.0"
    text = client.get("/metrics", headers={"authorization": f"Bearer {SCRAPER_KEY}"}).text
    (info,) = [
        s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == "lesionserve_model_info"
    ]
    assert (info["version"], info["sha256"]) == ("2.0.0", body["model"]["sha256"])
    assert reloads(client, "success") == done + 1
    # a reload of the file that serves already is no swap
    again = client.post(RELOAD, headers=ADMIN)
    assert again.status_code == 200 and again.json()["result"] == "unchanged"


@pytest.mark.parametrize(
    ("make_file", "check", "detail"),
    [
        (lambda p: p.write_bytes(b"this is no ONNX file") and p, "load", "not a loadable ONNX model"),
        (lambda p: model_v(p, "3.0.0", 3, classes=HAM_CLASSES[:5]), "contract", "class list"),
        (lambda p: model_v(p, "3.1.0", 3, size=48), "contract", "input size 32 -> 48"),
        (batch_of_one_only, "warm_up", "batch of 2"),
        (sigmoid_not_softmax, "canary", "sum to"),
    ],
    ids=["broken", "other-classes", "other-input-size", "fails-warm-up", "fails-canary"],
)
def test_a_bad_file_is_refused_naming_the_check_and_the_old_model_serves_on(
    served_app: Callable[..., TestClient],
    models_dir: Path,
    make_file: Callable[[Path], object],
    check: str,
    detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = served_app()
    make_file(models_dir / "bad.onnx")
    before = served_sha(client)
    failed_before = reloads(client, check)
    with caplog.at_level(logging.ERROR, logger="service.swap.reloader"):
        resp = client.post(RELOAD, json={"path": "bad.onnx"}, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["type"] == PROBLEM_BASE + "model-rejected" and problem["check"] == check
    assert detail in problem["detail"]
    assert served_sha(client) == before == sha(models_dir / "a.onnx")  # the old model serves on
    assert client.get("/readyz").status_code == 200
    assert reloads(client, check) == failed_before + 1
    refused = [r for r in caplog.records if r.getMessage().startswith("model reload refused")]
    assert [getattr(r, "check", None) for r in refused] == [check]


def test_audit_lines_name_the_model_that_answered(
    served_app: Callable[..., TestClient], models_dir: Path, tmp_path: Path
) -> None:
    """A request answered by the old model but audited after the swap is audited with the old model."""
    audit = tmp_path / "audit.jsonl"
    client = served_app(audit_log=str(audit))
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    old = runtime.served
    assert client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN).status_code == 200
    # what the middleware does once the old model's answer has gone out (the route left the model in state)
    runtime.audit_request({"request_id": "answered-by-a", "model_ref": old.ref()}, [], 200, 0.01)
    classify(client)
    client.__exit__(None, None, None)  # closes the audit trail
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    lines = [x for x in lines if x["input"]["content_type"] != "application/json"]  # the reload call's own line
    assert [line["model"]["sha256"] for line in lines] == [sha(models_dir / "a.onnx"), sha(models_dir / "b.onnx")]


def test_without_canary_images_no_model_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(checks, "CANARY_DIR", tmp_path)  # an install that lost its package data
    model = OnnxModel.load(model_v(tmp_path / "m.onnx", "1.0.0", 1), ["CPUExecutionProvider"])
    with pytest.raises(ModelRejected, match="no canary images"):
        checks.canary(Target(model.run, (32, 32, 3)), model.metadata.classes)


def test_force_accepts_a_new_class_list_and_answers_use_it(
    served_app: Callable[..., TestClient], models_dir: Path
) -> None:
    client = served_app()
    model_v(models_dir / "five.onnx", "3.0.0", 3, classes=HAM_CLASSES[:5])
    resp = client.post(RELOAD, json={"path": "five.onnx", "force": True}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["forced_changes"][0].startswith("class list")
    answer = classify(client)
    assert len(answer["predictions"]) == 5  # type: ignore[arg-type]


def test_a_request_keeps_the_model_it_was_decoded_for_across_a_forced_input_size_change(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """Bound at decode: a 32 px image queued when a 48 px, 5-class model takes over is run and answered by the old one."""
    from starlette.datastructures import Headers

    from service.explain import ood_check
    from service.media import pick_decoder
    from service.routes import build_answer

    rt = Runtime(settings_factory(), FakeModel(size=32))
    rt.start().join(10)
    big = model_v(tmp_path / "big.onnx", "4.0.0", 4, classes=HAM_CLASSES[:5], size=48)
    new = rt.serve(OnnxModel.load(big, ["CPUExecutionProvider"]))

    async def one_request() -> tuple[str, int, str, int]:
        async with rt.work() as deadline:
            decoder, data = await pick_decoder(Headers({"content-type": "image/jpeg"}), jpeg_bytes())
            decoded = await rt.decode(decoder, data, deadline)
            rt.switch(new)  # between this request's decode and its batch
            prediction = await rt.predict(decoded, deadline)
            ood = ood_check(rt.bound(prediction).meta, prediction.extras)
            answer = build_answer(rt, "r1", decoded, prediction, 0.0, ood)
            return answer.model.sha256, len(answer.predictions), rt.served.model.sha256, decoded.pixels.shape[0]

    try:
        answered_by, classes, serving_now, decoded_size = asyncio.run(one_request())
    finally:
        rt.close()
    assert (answered_by, classes, decoded_size) == (FakeModel.sha256, len(HAM_CLASSES), 32)
    assert serving_now == new.model.sha256


def test_the_old_session_is_released_once_its_requests_are_answered(
    served_app: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = served_app()
    classify(client)  # the old model's last batch; no request after the swap: an idle worker must let it go
    with caplog.at_level(logging.INFO, logger="service.swap.reloader"):
        assert client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN).status_code == 200
        until = time.monotonic() + 10
        while not any(r.getMessage() == "previous model released" for r in caplog.records):
            assert time.monotonic() < until, "the swapped-out model is still referenced"
            gc.collect()
            time.sleep(0.05)
    (released,) = [r for r in caplog.records if r.getMessage() == "previous model released"]
    assert released.model["version"] == "1.0.0"  # type: ignore[attr-defined]


def test_a_second_reload_while_one_runs_gets_409(served_app: Callable[..., TestClient], models_dir: Path) -> None:
    client = served_app()
    reloader = client.app.state.reloader  # type: ignore[attr-defined]
    entered, release = threading.Event(), threading.Event()
    load = reloader.load

    def slow_load(path: Path) -> object:
        entered.set()
        release.wait(10)
        return load(path)

    reloader.load = slow_load
    first: list[int] = []
    worker = threading.Thread(
        target=lambda: first.append(client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN).status_code)
    )
    worker.start()
    assert entered.wait(10)
    second = client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN)
    release.set()
    worker.join(10)
    assert second.status_code == 409 and second.json()["type"] == PROBLEM_BASE + "reload-in-progress"
    assert first == [200]


# --- who may reload what ---------------------------------------------------------------------------------


def test_admin_api_is_off_without_admin_key_ids(served_app: Callable[..., TestClient]) -> None:
    client = served_app(admin_key_ids="")
    resp = client.post(RELOAD, headers=ADMIN)
    assert resp.status_code == 403 and "LESIONSERVE_ADMIN_KEY_IDS" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": f"Bearer {USER_KEY}"}, 403), ({"authorization": f"Bearer {SCRAPER_KEY}"}, 403)],
    ids=["no-key", "user-key", "metrics-only-key"],
)
def test_only_admin_keys_may_reload(
    served_app: Callable[..., TestClient], headers: dict[str, str], status: int
) -> None:
    client = served_app()
    before = served_sha(client)
    resp = client.post(RELOAD, json={"path": "b.onnx"}, headers=headers)
    assert resp.status_code == status
    assert served_sha(client) == before


def test_reload_paths_must_be_onnx_files_inside_the_models_folder(
    served_app: Callable[..., TestClient], models_dir: Path, tmp_path: Path
) -> None:
    client = served_app()
    outside = model_v(tmp_path / "outside.onnx", "5.0.0", 5)
    (models_dir / "escape.onnx").symlink_to(outside)
    (models_dir / "notes.txt").write_text("x")
    for path in ["../outside.onnx", str(outside), "escape.onnx", "notes.txt", "missing.onnx", "/etc/passwd"]:
        resp = client.post(RELOAD, json={"path": path}, headers=ADMIN)
        assert resp.status_code == 400, path
        assert resp.json()["type"] == PROBLEM_BASE + "model-path-refused" and resp.json()["check"] == "path"
    # the same file through an absolute path inside the folder is fine
    assert client.post(RELOAD, json={"path": str(models_dir / "b.onnx")}, headers=ADMIN).status_code == 200


def test_models_dir_setting_moves_the_allowed_folder(
    served_app: Callable[..., TestClient], models_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    model_v(other / "c.onnx", "6.0.0", 6)
    client = served_app(models_dir=other)
    assert client.post(RELOAD, json={"path": "b.onnx"}, headers=ADMIN).status_code == 400  # MODEL_PATH's folder
    assert client.post(RELOAD, json={"path": "c.onnx"}, headers=ADMIN).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"admin_key_ids": "nobody"}, "admin_key_ids names keys that do not exist: nobody"),
        ({"admin_key_ids": "prom"}, "both in admin_key_ids and in metrics_only_key_ids"),
        ({"models_dir": "/no/such/folder"}, "models folder /no/such/folder does not exist"),
    ],
)
def test_bad_swap_settings_stop_the_start(
    settings_factory: Callable[..., Settings], overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings_factory(api_keys=KEYS, metrics_only_key_ids="prom", **overrides)


# --- the file watcher ------------------------------------------------------------------------------------


def test_watcher_reloads_a_renamed_file_and_ignores_one_written_in_place(
    served_app: Callable[..., TestClient], models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = served_app(model_watch=True, model_watch_interval_s=0.1)
    served = models_dir / "a.onnx"
    with caplog.at_level(logging.INFO):
        replace_atomically(models_dir / "b.onnx", served)
        wait_for(lambda: served_sha(client) == sha(models_dir / "b.onnx"), "the watcher's reload")
        # written in place (same inode): never read half-written, a warning says how to replace it
        model_v(models_dir / "c.onnx", "7.0.0", 7)
        with served.open("r+b") as fh:
            fh.write((models_dir / "c.onnx").read_bytes())
            fh.truncate()
        wait_for(lambda: any("modified in place" in r.getMessage() for r in caplog.records), "the in-place warning")
    assert served_sha(client) == sha(models_dir / "b.onnx")
    assert [r.trigger for r in caplog.records if r.getMessage() == "model reload success"] == ["watch"]  # type: ignore[attr-defined]


def test_watcher_does_not_retry_a_refused_file(
    served_app: Callable[..., TestClient], models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = served_app(model_watch=True, model_watch_interval_s=0.1)
    bad = sigmoid_not_softmax(models_dir / "bad.onnx")
    refused = reloads(client, "canary")  # the counter is per process: other tests' refusals are in it
    with caplog.at_level(logging.INFO):
        replace_atomically(bad, models_dir / "a.onnx")
        wait_for(lambda: reloads(client, "canary") == refused + 1, "the refused reload")
        time.sleep(1.0)  # ten more looks: a watcher that retried would refuse the file again (never a pass condition)
        replace_atomically(models_dir / "b.onnx", models_dir / "a.onnx")  # the fix arrives
        wait_for(lambda: served_sha(client) == sha(models_dir / "b.onnx"), "the second reload")
    assert reloads(client, "canary") == refused + 1  # the refused file was tried once, not at every look


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    until = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the batcher's side ----------------------------------------------------------------------------------


def test_the_batch_that_spans_a_swap_runs_as_one_call_per_model() -> None:
    old, new = FakeModel(), FakeModel()
    old_t, new_t = Target(old.run, (32, 32, 3)), Target(new.run, (32, 32, 3))
    items = [Pending(np.zeros((32, 32, 3), np.uint8), 1e18, target=t) for t in (old_t, old_t, new_t, old_t, new_t)]
    groups = by_target(items)
    assert [[i.target for i in g] for g in groups] == [[old_t] * 3, [new_t] * 2]
    batcher = Batcher(old.run, (32, 32, 3), max_batch=8, max_wait_s=0.0, queue_size=8)
    batcher._process_groups(items)
    assert (old.batches, new.batches) == ([3], [2])
    assert all(i.future.result(1).batch_size in (2, 3) for i in items)


def test_unbound_submissions_follow_the_batchers_current_target() -> None:
    old, new = FakeModel(), FakeModel()
    batcher = Batcher(old.run, (32, 32, 3), max_batch=4, max_wait_s=0.0, queue_size=8)
    batcher.start()
    try:
        batcher.submit(np.zeros((32, 32, 3), np.uint8), time.monotonic() + 10).result(5)
        batcher.target = Target(new.run, (32, 32, 3))
        batcher.submit(np.zeros((32, 32, 3), np.uint8), time.monotonic() + 10).result(5)
    finally:
        batcher.close(5)
    assert (old.batches, new.batches) == ([1], [1])


class CountingModel(FakeModel):
    """A fake model that records how many model runs (of any instance) are in progress at once."""

    lock = threading.Lock()
    running = 0
    most = 0

    def __init__(self, sha256: str) -> None:
        super().__init__()
        self.sha256 = sha256  # type: ignore[misc]

    def run(self, batch: np.ndarray) -> np.ndarray:
        with CountingModel.lock:
            CountingModel.running += 1
            CountingModel.most = max(CountingModel.most, CountingModel.running)
        try:
            time.sleep(0.01)  # long enough for a concurrent run to overlap, were there one
            return super().run(batch)
        finally:
            with CountingModel.lock:
                CountingModel.running -= 1


def test_a_swaps_checks_run_between_batches_never_beside_one(served_app: Callable[..., TestClient]) -> None:
    """Warm-up and canary runs of the new model are done by the batcher's worker between two batches."""
    old, new = CountingModel("1" * 64), CountingModel("2" * 64)
    client = TestClient(create_app(client_settings(served_app), model=old), raise_server_exceptions=False)
    with client:
        wait_ready(client)
        client.app.state.reloader.load = lambda path: new  # type: ignore[attr-defined]
        CountingModel.most = 0
        stop = threading.Event()
        shas: list[str] = []

        def load() -> None:
            while not stop.is_set():
                shas.append(served_sha(client))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(shas) >= 8, "traffic on the old model")
            resp = client.post(RELOAD, headers=ADMIN)
            wait_for(lambda: shas.count("2" * 64) >= 8, "traffic on the new model")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert resp.status_code == 200, resp.text
    assert new.batches[:4] == [1, 2, 3, 4] and new.batches[4:8] == [1, 1, 1, 1]  # warm-up, then the canary
    assert CountingModel.most == 1  # never two model runs at once, though 4 clients kept the old model busy


def client_settings(served_app: Callable[..., TestClient]) -> Settings:
    """The settings ``served_app`` uses (its first client's), for an app built around a fake model."""
    probe = served_app()
    settings: Settings = probe.app.state.runtime.settings  # type: ignore[attr-defined]
    return settings


def test_a_check_run_waits_while_the_oldest_request_would_miss_its_deadline_behind_it() -> None:
    """The worker is driven by hand (not started): each step is what one turn of its loop does."""
    from service.batcher import collect_batch

    model = FakeModel()
    batcher = Batcher(model.run, (32, 32, 3), max_batch=1, max_wait_s=0.0, queue_size=8)
    batcher._between_s = 5.0  # the last check run took 5 s
    ran: list[str] = []
    check = batcher.run_between(lambda: ran.append("check"))
    tight = batcher.submit(np.zeros((32, 32, 3), np.uint8), time.monotonic() + 3)  # < 2 x 5 s left
    batcher._one_between()
    assert ran == [] and not check.done()  # postponed: the request would miss its deadline behind it
    batcher._process_groups(collect_batch(batcher._queue, 1, 0.0, 0.0))
    assert tight.result(1).batch_size == 1
    relaxed = batcher.submit(np.zeros((32, 32, 3), np.uint8), time.monotonic() + 60)  # plenty of time left
    batcher._one_between()
    assert ran == ["check"] and check.done() and not relaxed.done()  # the check ran first


# --- what a reload may not do without force, and paths that used to be 500s (issue 28, findings 8 and 13) ---
def knows_the_canary(client: TestClient) -> None:
    """The serving model's canary answers (run when it started) as the images' known diagnoses: a good model."""
    client.app.state.runtime.served.canary_top = [checks.CANARY_LABELS[n] for n, _ in checks.canary_images()]  # type: ignore[attr-defined]


def always_nevus(path: Path) -> Path:
    """A model that answers "nevus 100%" whatever the image (zero weights, a large nevus bias)."""
    src = model_v(path.with_suffix(".src.onnx"), "9.2.0", seed=7)

    def edit(model: onnx.ModelProto) -> None:
        for i, init in enumerate(model.graph.initializer):
            if init.name == "w":
                model.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(np.zeros((3, len(HAM_CLASSES)), np.float32), "w")
                )
            if init.name == "b":
                bias = np.zeros(len(HAM_CLASSES), np.float32)
                bias[HAM_CLASSES.index("nv")] = 20.0
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias, "b"))

    return _rewire(src, path, edit)


def test_a_model_that_answers_nevus_for_everything_needs_force(
    served_app: Callable[..., TestClient], models_dir: Path
) -> None:
    client = served_app()
    knows_the_canary(client)
    always_nevus(models_dir / "nevus.onnx")
    before = served_sha(client)
    r = client.post(RELOAD, json={"path": "nevus.onnx"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["check"] == "canary"  # old code: 200, "4 of 4 changed"
    assert "2 of 4 canary images right" in r.json()["detail"] and served_sha(client) == before
    forced = client.post(RELOAD, json={"path": "nevus.onnx", "force": True}, headers=ADMIN)
    assert forced.status_code == 200 and any("canary" in c for c in forced.json()["forced_changes"])


def test_a_model_without_the_ood_output_needs_force(served_app: Callable[..., TestClient], models_dir: Path) -> None:
    make_tiny_onnx(models_dir / "with-ood.onnx", seed=3, ood=True)
    make_tiny_onnx(models_dir / "no-ood.onnx", seed=4)
    client = served_app(model_path=models_dir / "with-ood.onnx")
    r = client.post(RELOAD, json={"path": "no-ood.onnx"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["check"] == "contract"  # old code: 200, the OOD check silently gone
    assert "output 'ood_score' removed" in r.json()["detail"]


def test_a_model_too_slow_for_the_request_timeout_needs_force(
    served_app: Callable[..., TestClient], models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = served_app(request_timeout_s=0.4)
    reloader = client.app.state.reloader  # type: ignore[attr-defined]
    monkeypatch.setattr(reloader, "load", lambda path: FakeModel(delay_s=0.15))  # 0.15 s a run: over 0.4 / 4
    (models_dir / "slow.onnx").write_bytes(b"stands for a slow model")
    r = client.post(RELOAD, json={"path": "slow.onnx"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["check"] == "warm_up"  # old code: 200, then 504s
    assert "slowest check run took" in r.json()["detail"]


@pytest.mark.parametrize(
    "path", ["a\x00.onnx", "x" * 5000 + ".onnx", "loop.onnx"], ids=["nul-byte", "too-long", "symlink-loop"]
)
def test_unusable_reload_paths_are_400_without_the_server_folder(
    served_app: Callable[..., TestClient], models_dir: Path, path: str
) -> None:
    (models_dir / "loop.onnx").symlink_to(models_dir / "loop.onnx")
    client = served_app()
    r = client.post(RELOAD, json={"path": path}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["type"].endswith("/model-path-refused")  # old code: 500
    assert str(models_dir.resolve()) not in r.text


def test_a_path_outside_the_folder_is_refused_without_naming_the_folder(
    served_app: Callable[..., TestClient], models_dir: Path
) -> None:
    r = served_app().post(RELOAD, json={"path": "/etc/passwd.onnx"}, headers=ADMIN)
    assert r.status_code == 400 and "outside the models folder" in r.json()["detail"]
    assert str(models_dir.resolve()) not in r.text  # old code: the detail named it
