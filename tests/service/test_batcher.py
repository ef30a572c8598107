"""service.batcher: batch collection as a pure function on a plain queue, then the Batcher with a fake model."""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.batcher import Batcher, Prediction, batch_sizes, collect_batch
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from tests.conftest import REPO
from tests.service.conftest import SIZE, FakeModel

SHAPE = (SIZE, SIZE, 3)


def image(red: int) -> np.ndarray:
    img = np.zeros(SHAPE, dtype=np.uint8)
    img[..., 0] = red
    return img


def far() -> float:
    return time.monotonic() + 30


def filled(items: list[int]) -> queue.Queue[int]:
    q: queue.Queue[int] = queue.Queue()
    for item in items:
        q.put(item)
    return q


# --- collect_batch: pure, with a plain queue ----------------------------------------------------


def test_collect_takes_what_is_waiting_up_to_max_batch() -> None:
    q = filled(list(range(10)))
    assert collect_batch(q, max_batch=4, max_wait_s=0.0) == [0, 1, 2, 3]
    assert collect_batch(q, max_batch=4, max_wait_s=0.0) == [4, 5, 6, 7]
    assert collect_batch(q, max_batch=4, max_wait_s=0.0) == [8, 9]


def test_collect_returns_empty_when_nothing_comes() -> None:
    start = time.monotonic()
    assert collect_batch(filled([]), 4, 0.0, first_timeout=0.05) == []
    assert time.monotonic() - start < 1.0


def test_collect_waits_at_most_max_wait_for_stragglers() -> None:
    q = filled([1])
    start = time.monotonic()
    assert collect_batch(q, max_batch=8, max_wait_s=0.1) == [1]
    waited = time.monotonic() - start
    assert 0.09 <= waited < 1.0


def test_collect_gathers_an_item_arriving_within_max_wait() -> None:
    q = filled([1])
    threading.Timer(0.03, q.put, args=(2,)).start()
    assert collect_batch(q, max_batch=8, max_wait_s=0.5) == [1, 2]


def test_collect_does_not_wait_when_nothing_more_is_coming() -> None:
    q = filled([1])
    start = time.monotonic()
    assert collect_batch(q, max_batch=8, max_wait_s=2.0, more_coming=lambda: False) == [1]
    assert time.monotonic() - start < 0.5  # a lone request pays no batching delay


def test_batch_sizes_padded_and_not() -> None:
    assert batch_sizes(8, pad=False) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert batch_sizes(8, pad=True) == [1, 2, 4, 8]
    assert batch_sizes(12, pad=True) == [1, 2, 4, 8, 12]


# --- Batcher with a fake model --------------------------------------------------------------------


def make_batcher(model: FakeModel, start: bool = True, **kwargs: object) -> Batcher:
    """A batcher on the fake model; ``start=False`` lets a test queue images before the worker runs."""
    options: dict[str, object] = {"max_batch": 8, "max_wait_s": 0.05, "queue_size": 64}
    options.update(kwargs)
    batcher = Batcher(model.run, SHAPE, **options)  # type: ignore[arg-type]
    if start:
        batcher.start()
    return batcher


def test_concurrent_submits_form_one_batch_and_rows_go_to_their_callers() -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False)  # all six are queued before the worker collects
    waited_before = REGISTRY.get_sample_value("lesionserve_queue_wait_seconds_sum") or 0.0
    try:
        futures = [batcher.submit(image(red), far()) for red in (0, 50, 100, 150, 200, 250)]
        batcher.start()
        results = [f.result(5) for f in futures]
    finally:
        batcher.close(5)
    waited = (REGISTRY.get_sample_value("lesionserve_queue_wait_seconds_sum") or 0.0) - waited_before
    assert 0 <= waited < 6 * 5  # six waits of well under 5 s each
    assert model.batches == [6]
    assert all(r.batch_size == 6 for r in results)
    assert all(0 <= r.queue_s < 5 and 0 <= r.inference_s < 5 for r in results)
    for red, result in zip((0, 50, 100, 150, 200, 250), results, strict=True):
        expected = model.run(image(red)[None])[0]
        np.testing.assert_allclose(result.probabilities, expected, rtol=1e-6)


def test_max_batch_is_honoured() -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False, max_batch=4)
    try:
        futures = [batcher.submit(image(i), far()) for i in range(10)]
        batcher.start()
        [f.result(5) for f in futures]
    finally:
        batcher.close(5)
    assert max(model.batches) <= 4
    assert sum(model.batches) == 10


def lone_request_seconds(max_wait_s: float, *announcements: int) -> float:
    """How long one submitted image takes to be answered after ``expect()`` was called with each announcement."""
    batcher = make_batcher(FakeModel(), max_wait_s=max_wait_s)
    for delta in announcements:
        batcher.expect(delta)
    try:
        start = time.monotonic()
        assert batcher.submit(image(1), far()).result(5).batch_size == 1
        return time.monotonic() - start
    finally:
        batcher.close(5)


def test_max_wait_is_honoured_for_a_lone_request() -> None:
    # something announced as "being decoded" that never arrives
    assert 0.18 <= lone_request_seconds(0.2, +1) < 2.0


def test_a_lone_request_with_nothing_announced_runs_at_once() -> None:
    assert lone_request_seconds(2.0) < 1.0  # not the 2 s max_wait


def test_announcements_add_up_and_the_batcher_waits_while_any_is_left() -> None:
    # one of two arrived elsewhere or failed; the other is still decoding
    assert lone_request_seconds(0.3, +1, +1, -1) >= 0.25


def test_a_retracted_announcement_ends_the_wait_at_once() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_wait_s=2.0)
    batcher.expect(+1)  # an image is decoding...
    try:
        start = time.monotonic()
        future = batcher.submit(image(1), far())
        threading.Timer(0.05, batcher.expect, args=(-1,)).start()  # ...and its decode fails
        future.result(5)
        took = time.monotonic() - start
    finally:
        batcher.close(5)
    assert took < 0.5  # the batch left when nothing more was coming, not after max_wait


def test_close_of_an_idle_batcher_is_prompt() -> None:
    batcher = make_batcher(FakeModel())
    time.sleep(0.1)  # the worker is waiting for a first image
    start = time.monotonic()
    batcher.close(5)
    assert time.monotonic() - start < 0.5


def test_close_gives_up_after_its_timeout_when_the_model_hangs() -> None:
    model, batcher, blocker = busy_batcher()
    start = time.monotonic()
    batcher.close(0.2)
    took = time.monotonic() - start
    model.gate.set()
    blocker.result(5)
    assert took < 2  # the hung run holds the worker for 10 s; close() must not wait for it


def test_the_worker_is_a_named_daemon_thread_that_never_holds_the_process() -> None:
    batcher = make_batcher(FakeModel())
    try:
        assert "lesionserve-batcher" in [t.name for t in threading.enumerate()]  # as thread dumps show it
    finally:
        batcher.close(5)
    # a process that ends without close() (a forced stop) must still exit
    script = "import numpy as np\nfrom service.batcher import Batcher\n" + (
        "Batcher(lambda b: np.zeros((len(b), 2), np.float32), (4, 4, 3), max_batch=1, max_wait_s=0, queue_size=1).start()"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=20, check=True)


def test_queue_full_raises_overloaded_with_retry_after() -> None:
    model = FakeModel()
    model.gate.clear()
    batcher = make_batcher(model, queue_size=2, max_batch=1)
    try:
        first = batcher.submit(image(1), far())
        assert model.entered.wait(5)  # the worker took it and blocks in run(); the queue is empty again
        kept = [batcher.submit(image(2), far()), batcher.submit(image(3), far())]
        with pytest.raises(Overloaded) as err:
            batcher.submit(image(4), far())
        assert err.value.headers["Retry-After"] == "1"
        assert err.value.detail == "the inference queue is full; retry shortly"
        model.gate.set()
        assert all(isinstance(f.result(5), Prediction) for f in [first, *kept])
    finally:
        batcher.close(5)


def busy_batcher() -> tuple[FakeModel, Batcher, Future[Prediction]]:
    """A max-batch-1 batcher whose worker is blocked inside run() on a first request."""
    model = FakeModel()
    model.gate.clear()
    batcher = make_batcher(model, max_batch=1)
    blocker = batcher.submit(image(1), far())
    assert model.entered.wait(5)
    return model, batcher, blocker


def test_expired_requests_are_dropped_before_inference() -> None:
    model, batcher, blocker = busy_batcher()
    try:
        expired = batcher.submit(image(2), time.monotonic() + 0.05)
        live = batcher.submit(image(3), far())
        time.sleep(0.15)  # the second one's deadline passes while the worker is busy
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            expired.result(5)
        blocker.result(5)
        live.result(5)
    finally:
        batcher.close(5)
    assert model.batches == [1, 1]  # the expired image never reached the model


def test_cancelled_requests_are_skipped() -> None:
    model, batcher, blocker = busy_batcher()
    try:
        gone: Future[Prediction] = batcher.submit(image(2), far())
        assert gone.cancel()
        model.gate.set()
        blocker.result(5)
        time.sleep(0.1)
    finally:
        batcher.close(5)
    assert model.batches == [1]


def test_a_cancelled_or_expired_request_does_not_stop_the_rest_of_its_batch() -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False)
    try:
        cancelled = batcher.submit(image(1), far())
        expired = batcher.submit(image(2), time.monotonic() - 1)
        live = [batcher.submit(image(red), far()) for red in (3, 4)]
        assert cancelled.cancel()
        batcher.start()
        with pytest.raises(DeadlineExceeded) as err:
            expired.result(5)
        assert err.value.detail == "the request deadline passed while it was queued"
        assert [f.result(5).batch_size for f in live] == [2, 2]
    finally:
        batcher.close(5)
    assert model.batches == [2]


def test_a_bad_input_fails_only_its_own_request() -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False)
    try:
        futures = [batcher.submit(image(red), far()) for red in (10, 13, 20)]  # 13 is poison
        batcher.start()
        good_a, bad, good_b = futures
        with pytest.raises(InferenceFailed) as err:
            bad.result(5)
        assert err.value.detail == "inference failed for this image"  # the caller's words, no internals
        for red, good in ((10, good_a), (20, good_b)):
            result = good.result(5)
            assert result.batch_size == 1
            np.testing.assert_allclose(result.probabilities, model.run(image(red)[None])[0], rtol=1e-6)
            assert 0 <= result.queue_s < 5 and 0 <= result.inference_s < 5
        # and the batcher keeps serving afterwards
        assert batcher.submit(image(30), far()).result(5).batch_size == 1
    finally:
        batcher.close(5)
    assert model.batches[:4] == [3, 1, 1, 1]  # the failed batch of 3, then one retry per image


def test_a_failing_model_fails_requests_and_the_worker_survives(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel()
    model.fail_all = True
    batcher = make_batcher(model)
    try:
        with caplog.at_level(logging.WARNING, logger="service.batcher"), pytest.raises(InferenceFailed) as err:
            batcher.submit(image(1), far()).result(5)
        assert err.value.detail == "inference failed for this image"
        assert model.batches == [1]  # a lone image that failed is not retried
        assert [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
            ("ERROR", "inference failed", True)
        ]
        model.fail_all = False
        assert batcher.submit(image(1), far()).result(5).batch_size == 1
    finally:
        batcher.close(5)


def test_failures_are_logged_once_each_with_the_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False)
    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        try:
            futures = [batcher.submit(image(red), far()) for red in (13, 13)]
            batcher.start()
            for f in futures:
                with pytest.raises(InferenceFailed):
                    f.result(5)
        finally:
            batcher.close(5)
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records == [
        ("WARNING", "batch of 2 failed; retrying image by image", False),
        ("ERROR", "inference failed", True),
        ("ERROR", "inference failed", True),
    ]


@pytest.mark.parametrize(
    "answer",
    [lambda b: np.zeros(len(b), np.float32), lambda b: np.zeros((len(b) + 1, 7), np.float32)],
    ids=["1-d", "extra-row"],
)
def test_a_model_answer_of_the_wrong_shape_fails_the_request(
    answer: Callable[[np.ndarray], np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    batcher = Batcher(answer, SHAPE, max_batch=8, max_wait_s=0.0, queue_size=8)
    batcher.start()
    try:
        with pytest.raises(InferenceFailed):
            batcher.submit(image(1), far()).result(5)
    finally:
        batcher.close(5)
    error = next(r for r in caplog.records if r.exc_info is not None)
    assert "model returned shape" in str(error.exc_info[1]) and "for a batch of 1" in str(error.exc_info[1])


def test_wrong_array_is_refused_at_submit() -> None:
    batcher = Batcher(FakeModel().run, SHAPE, max_batch=8, max_wait_s=0.0, queue_size=8)
    with pytest.raises(ValueError, match="expected uint8"):
        batcher.submit(np.zeros(SHAPE, dtype=np.float32), far())
    with pytest.raises(ValueError, match="expected uint8"):
        batcher.submit(np.zeros((SIZE + 1, SIZE, 3), dtype=np.uint8), far())


def test_padding_runs_fixed_shapes_and_answers_real_rows() -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False, pad=True)
    try:
        futures = [batcher.submit(image(red), far()) for red in (10, 20, 30)]
        batcher.start()
        results = [f.result(5) for f in futures]
    finally:
        batcher.close(5)
    assert model.batches == [4]  # 3 padded to the next fixed size
    assert [r.batch_size for r in results] == [3, 3, 3]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_padding_leaves_a_batch_of_a_fixed_size_as_it_is(n: int) -> None:
    model = FakeModel()
    batcher = make_batcher(model, start=False, pad=True)
    try:
        futures = [batcher.submit(image(red), far()) for red in range(n)]
        batcher.start()
        assert [f.result(5).batch_size for f in futures] == [n] * n
    finally:
        batcher.close(5)
    assert model.batches == [n]


def test_warm_up_runs_every_batch_size() -> None:
    model = FakeModel()
    assert Batcher(model.run, SHAPE, max_batch=4, max_wait_s=0.0, queue_size=8).warm_up() == [1, 2, 3, 4]
    assert Batcher(model.run, SHAPE, max_batch=8, max_wait_s=0.0, queue_size=8, pad=True).warm_up() == [1, 2, 4, 8]
    assert model.batches == [1, 2, 3, 4, 1, 2, 4, 8]


def test_close_finishes_what_is_queued() -> None:
    model = FakeModel(delay_s=0.02)
    batcher = make_batcher(model, max_batch=2)
    futures = [batcher.submit(image(i), far()) for i in range(6)]
    batcher.close(5)
    assert all(f.done() and f.exception() is None for f in futures)
