"""The soak and fault run (``python -m service.bench.soak``) in its short form: CI runs it on every change.

About a minute: 40 s of mixed traffic (good uploads, bad inputs, oversize bodies, hang-ups mid-upload and
mid-answer, trickling uploads, heads that never end) against a real ``python -m service`` with the tiny
model, then SIGTERM while uploads are still flowing. The long form's figures are in docs/service.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.bench import soak


@pytest.mark.slow
def test_short_soak_loses_nothing_and_every_figure_adds_up(tmp_path: Path, tiny_onnx: Path) -> None:
    report = soak.soak(tiny_onnx, duration_s=40, rate=5, rss_bound_mb=48, workdir=tmp_path)
    assert report["failures"] == [], report
    sent = report["sent"]
    # every kind of client really took part, and the service saw each kind
    for kind in ("good", "undecodable", "oversize-declared", "oversize-streamed", "gone-mid-upload",
                 "gone-mid-answer", "slow-upload", "slow-head"):  # fmt: skip
        assert sent.get(kind, 0) > 0, kind
    assert report["server_statuses"]["499"] >= sent["gone-mid-upload"]
    assert report["server_statuses"]["408"] == sent["slow-upload"]
    assert report["exit_code"] == 0 and report["drained"]
    assert report["sigterm_under_traffic"].get("200", 0) > 0  # the signal came while uploads were flowing


def test_the_checks_catch_what_the_soak_guards(tmp_path: Path) -> None:
    """The assertions themselves: a 500, an error log line, a leaked fd or missing metrics each fail the run."""
    tally = soak.Tally()
    for _ in range(3):
        tally.record("good", "200")
    tally.record("gone-mid-upload", "hung-up")
    good = {("lesionserve_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "200"))): 3.0,
            ("lesionserve_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "499"))): 1.0,
            ("lesionserve_client_disconnects_total", (("stage", "upload"),)): 1.0}  # fmt: skip
    audit = [{"outcome": {"status": 200, "problem": None}}] * 3 + [
        {"outcome": {"status": 499, "problem": "https://lesionserve.dev/problems/client-closed"}}
    ]
    report = {"rss_growth_mb": 1.0, "fds_baseline": 18, "fds_end": 18, "exit_code": 0}
    assert soak.check(report, tally, good, '{"level": "INFO"}', audit, 48) == []
    key500 = ("lesionserve_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "500")))
    broken = [
        (report, {**good, key500: 1.0}, "", audit),  # a 500
        (report, good, '{"level": "ERROR", "message": "unhandled error"}', audit),  # an error line
        ({**report, "fds_end": 19}, good, "", audit),  # a leaked descriptor
        ({**report, "rss_growth_mb": 100.0}, good, "", audit),  # memory growth
        ({**report, "exit_code": 1}, good, "", audit),  # SIGTERM not clean
        ({**report, "sigterm_under_traffic": {"200": 3, "cut-off-ReadError": 1}}, good, "", audit),  # one lost
        (report, good, "", audit[:3]),  # a request without its audit line
        (report, {**good, good.__iter__().__next__(): 2.0}, "", audit),  # the metrics do not add up
    ]
    for rep, samples, log, lines in broken:
        assert soak.check(rep, tally, samples, log, lines, 48) != []
