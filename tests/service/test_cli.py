"""The ``lesionserve`` command against a real ``lesionserve serve`` process: classify (CSV/JSONL, resume, bad
files, FHIR), models, health; and the argument rules (flags over variables, unknown flags refused, --help)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.service.cli_server import cli_server


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cli_server(tiny_onnx, tmp_path_factory.mktemp("cli") / "server.log") as base:
        yield base


def lesionserve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path, isic_images: list[Path]) -> Path:
    """The committed ISIC images in two sub-folders, plus a broken JPEG and a text file that is skipped."""
    root = tmp_path / "images"
    for p in isic_images:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_classify_a_folder_into_csv_then_resume(server: str, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    first = lesionserve("classify", str(folder), "--url", server, "--out", str(out))
    assert first.returncode == 1, first.stderr  # one image failed
    rows = read_csv(out)
    assert len(rows) == 13  # 12 images and the broken one; notes.txt is not an image
    by_path = {Path(r["path"]).name: r for r in rows}
    broken = by_path.pop("broken.jpg")
    assert broken["status"] == "400" and broken["error"] and not broken["top_class"]
    for row in by_path.values():
        assert row["error"] == "" and len(row["sha256"]) == 64 and row["model_name"] == "tiny-test-model"
        probabilities = [float(v) for k, v in row.items() if k.startswith("p_")]
        assert len(probabilities) == 7 and abs(sum(probabilities) - 1) < 1e-4
        top = max((float(v), k) for k, v in row.items() if k.startswith("p_"))[1]
        assert row["top_class"] == top.removeprefix("p_")
        assert row["request_id"] and row["malignant"] in ("True", "False")
    assert "12 classified, 1 failed" in first.stderr
    again = lesionserve("classify", str(folder), "--url", server, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "0 classified, 0 failed, 13 already in" in again.stderr
    assert len(read_csv(out)) == 13  # nothing written twice


def test_resume_retries_only_what_failed_for_the_server(server: str, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    down = lesionserve("classify", str(folder), "--url", "http://127.0.0.1:9", "--retries", "0", "--out", str(out))
    assert down.returncode == 2 and "cannot reach" in down.stderr  # no server: nothing started, nothing written
    assert not out.exists() or out.read_text() == ""
    done = lesionserve("classify", str(folder / "nevus"), "--url", server, "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["p_mel"], float) for r in rows)
    # an earlier run's rows for two melanoma images: one lost to the server (retried), one refused as bad (kept)
    transient, refused = sorted((folder / "melanoma").iterdir())[:2]
    with out.open("a") as fh:
        fh.write(
            json.dumps({**rows[0], "path": str(transient), "status": "", "error": "no answer: ReadTimeout"}) + "\n"
        )
        fh.write(json.dumps({**rows[0], "path": str(refused), "status": 400, "error": "400: bad"}) + "\n")
    more = lesionserve("classify", str(folder / "melanoma"), "--url", server, "--out", str(out), "--format", "jsonl")
    assert "5 classified, 0 failed, 1 already in" in more.stderr, more.stderr
    last = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}  # the last row for a path counts
    assert last[str(transient)]["error"] == "" and last[str(refused)]["error"] == "400: bad"


def test_results_of_another_model_family_are_not_mixed(server: str, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "old.csv"
    out.write_text("path,sha256,top_class,p_cat,p_dog\n")
    proc = lesionserve("classify", str(folder), "--url", server, "--out", str(out))
    assert proc.returncode == 2 and "other classes" in proc.stderr
    assert out.read_text() == "path,sha256,top_class,p_cat,p_dog\n"


def test_fhir_reports_and_dicom_input(server: str, tmp_path: Path) -> None:
    dicom = REPO / "tests" / "data" / "dicom" / "ISIC_0000000_vlphoto.dcm"
    fhir = tmp_path / "fhir"
    proc = lesionserve("classify", str(dicom), "--url", server, "--out", str(tmp_path / "r.csv"), "--fhir", str(fhir))
    assert proc.returncode == 0, proc.stderr
    (row,) = read_csv(tmp_path / "r.csv")
    report = json.loads((fhir / f"{row['sha256']}.json").read_text())
    assert report["resourceType"] == "DiagnosticReport"


def test_missing_path_is_refused_before_any_work(server: str, tmp_path: Path) -> None:
    proc = lesionserve("classify", str(tmp_path / "nope"), "--url", server, "--out", str(tmp_path / "r.csv"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    assert not (tmp_path / "r.csv").exists()


def test_models_and_health(server: str) -> None:
    models = lesionserve("models", "--url", server)
    assert models.returncode == 0 and "tiny-test-model 0.0.1" in models.stdout
    health = lesionserve("health", "--url", server)
    assert health.returncode == 0 and "ready=ready" in health.stdout
    via_env = lesionserve("health", LESIONSERVE_URL=server)
    assert via_env.returncode == 0
    flag_wins = lesionserve("health", "--url", "http://127.0.0.1:9", LESIONSERVE_URL=server)
    assert flag_wins.returncode == 2 and "unreachable" in flag_wins.stdout


@pytest.mark.parametrize(
    "args",
    [["serve", "--prot", "9000"], ["classify", "x", "--out", "y", "--bogus"], ["health", "--url", "http://x", "extra"]],
)
def test_unknown_arguments_are_errors(args: list[str]) -> None:
    proc = lesionserve(*args)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_python_m_service_takes_flags_and_refuses_unknown_ones(tiny_onnx: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    run = [sys.executable, "-m", "service"]
    helped = subprocess.run([*run, "--help"], cwd=REPO, env=clean, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--port" in helped.stdout and "--model" in helped.stdout
    bad = subprocess.run([*run, "--port", "9000", "--hots", "x"], cwd=REPO, env=clean, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--hots" in bad.stderr
    refused = subprocess.run([*run, "--model", str(tiny_onnx), "--port", "99999"], cwd=REPO, env=clean,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "LESIONSERVE_PORT" in refused.stderr  # the flag was read, and checked


def test_503_is_retried_after_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import client as cli_client

    answers = iter([httpx.Response(503, headers={"retry-after": "2"}), httpx.Response(503), httpx.Response(200)])
    slept: list[float] = []
    monkeypatch.setattr(cli_client.time, "sleep", slept.append)
    with httpx.Client(transport=httpx.MockTransport(lambda request: next(answers)), base_url="http://x") as c:
        assert cli_client.send(c, "POST", "/v1/classify", retries=5).status_code == 200
    assert slept == [2.0, 1.0]
    gave_up = iter([httpx.Response(503)] * 3)
    with httpx.Client(transport=httpx.MockTransport(lambda request: next(gave_up)), base_url="http://x") as c:
        assert cli_client.send(c, "POST", "/v1/classify", retries=1).status_code == 503  # the last answer, as is


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["classify", "x", "--out", "y", "--concurrency", "0"], "LESIONSERVE_CONCURRENCY"),
     (["health", "--url", "ftp://x"], "LESIONSERVE_URL")],
)  # fmt: skip
def test_bad_client_settings_are_one_line(args: list[str], needle: str) -> None:
    proc = lesionserve(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
