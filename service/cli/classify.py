"""``lesionserve classify PATH... --out results.csv``: every image under the paths through a running server.

Images (JPEG, PNG, DICOM) go to ``/v1/classify`` from ``--concurrency`` threads, so the server's batcher
sees them together; each answer becomes one row of the results file as soon as it comes
(:mod:`service.cli.results`). A 503 is retried after its ``Retry-After``. A bad image gets a row with
its error and the run goes on; the exit status is 1 when any image failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.cli.client import ServerError, add_client_flags, client_settings, detail, get_models, open_client, send
from service.cli.results import ResultsFile, ResultsMismatch

SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom"}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="Image files and folders (searched recursively).")
    parser.add_argument("--out", type=Path, required=True, help="Results file; an existing one is resumed.")
    parser.add_argument("--format", choices=["csv", "jsonl"], default=None, help="Default: from --out's suffix.")
    parser.add_argument("--fhir", type=Path, default=None, help="Also save each answer's FHIR DiagnosticReport here.")
    parser.add_argument("--quiet", action="store_true", help="No progress line (the summary is still printed).")
    add_client_flags(parser, batch=True)


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files (by suffix) under each folder, sorted, each once.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in SUFFIXES:
                    found.setdefault(p, None)
        elif path.is_file():
            found.setdefault(path, None)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(found)


def content_type(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "application/dicom"
    return "image/png" if data.startswith(b"\x89PNG\r\n\x1a\n") else "image/jpeg"


@dataclass
class Tally:
    answered: int = 0
    failed: int = 0
    malignant: int = 0
    ood: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Classifier:
    """Classify one image and return its row (never raises for the image's or the network's failure)."""

    def __init__(self, client: httpx.Client, classes: list[str], retries: int, fhir: Path | None) -> None:
        self.client, self.classes, self.retries, self.fhir = client, classes, retries, fhir

    def row(self, path: Path) -> dict[str, Any]:
        row: dict[str, Any] = {"path": str(path)}
        try:
            data = path.read_bytes()
        except OSError as exc:
            return {**row, "status": "", "error": f"cannot read the file: {exc.strerror}"}
        row["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            response = send(self.client, "POST", "/v1/classify", self.retries, content=data,
                            headers={"content-type": content_type(data)})  # fmt: skip
        except httpx.TransportError as exc:
            return {**row, "status": "", "error": f"no answer from the server: {exc.__class__.__name__}"}
        row["request_id"] = response.headers.get("x-request-id", "")
        if response.status_code != 200:
            return {**row, "status": response.status_code, "error": detail(response)}
        answer = response.json()
        probabilities = {p["code"]: p["probability"] for p in answer["predictions"]}
        ood = answer.get("ood") or {}
        row.update(
            top_class=answer["top"]["code"],
            **{f"p_{c}": probabilities.get(c) for c in self.classes},
            malignancy_score=answer["malignancy"]["score"],
            malignant=answer["malignancy"]["above_threshold"],
            ood=ood.get("out_of_distribution") if ood.get("available") else "",
            model_name=answer["model"]["name"],
            model_version=answer["model"]["version"],
            model_sha256=answer["model"]["sha256"],
            status=200,
            error="",
        )
        if self.fhir is not None:
            self.save_fhir(answer, row["sha256"])
        return row

    def save_fhir(self, answer: dict[str, Any], sha256: str) -> None:
        # Built here from the JSON answer by the server's own code, instead of asking a second time for
        # application/fhir+json: one inference per image.
        from service.hospital.fhir import diagnostic_report
        from service.schemas import ClassifyResponse

        parsed = ClassifyResponse.model_validate(answer)
        identifiers = parsed.dicom.identifiers if parsed.dicom is not None else None
        report = diagnostic_report(parsed, identifiers=identifiers, issued=datetime.now(UTC))
        assert self.fhir is not None
        (self.fhir / f"{sha256}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


def progress(done: int, total: int, failed: int, started: float) -> str:
    rate = done / max(time.monotonic() - started, 1e-9)
    return f"\r[{done}/{total}] {rate:.1f} images/s, {failed} errors"


def run(args: argparse.Namespace) -> int:
    """0: every image answered; 1: some failed (their rows say why); 2: nothing could be started."""
    settings = client_settings(args)  # a ValidationError is reported by service.cli.main
    try:
        images = find_images(args.paths)
    except FileNotFoundError as exc:
        print(f"lesionserve: {exc}", file=sys.stderr)
        return 2
    fmt = args.format or ("jsonl" if args.out.suffix.lower() in (".jsonl", ".ndjson") else "csv")
    if args.fhir is not None:
        args.fhir.mkdir(parents=True, exist_ok=True)
    with open_client(settings) as client:
        try:
            classes: list[str] = get_models(client, settings, settings.retries)["models"][0]["classes"]
        except ServerError as exc:  # nothing is started, nothing written
            print(f"lesionserve: {exc}", file=sys.stderr)
            return 2
        try:
            results = ResultsFile(args.out, fmt, classes)
        except ResultsMismatch as exc:
            print(f"lesionserve: {exc}", file=sys.stderr)
            return 2
        todo = [p for p in images if str(p) not in results.done]
        skipped = len(images) - len(todo)
        tally, started = Tally(), time.monotonic()
        classifier = Classifier(client, classes, settings.retries, args.fhir)
        show = not args.quiet and sys.stderr.isatty()
        try:
            for row in _rows(classifier, todo, settings.concurrency):
                results.write(row)
                _count(tally, row)
                if show:
                    print(progress(tally.answered + tally.failed, len(todo), tally.failed, started), end="",
                          file=sys.stderr)  # fmt: skip
        finally:
            results.close()
    elapsed = time.monotonic() - started
    if show:
        print(file=sys.stderr)
    print(summary(tally, len(images), skipped, elapsed, args.out), file=sys.stderr)
    return 1 if tally.failed else 0


def _rows(classifier: Classifier, todo: list[Path], concurrency: int) -> Iterator[dict[str, Any]]:
    # Completion order: a slow image does not hold back the rows (and the progress) of the others.
    with ThreadPoolExecutor(concurrency, thread_name_prefix="classify") as pool:
        futures = [pool.submit(classifier.row, p) for p in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # Ctrl-C: what is queued is dropped; what was written stays, the next run resumes
            for f in futures:
                f.cancel()


def _count(tally: Tally, row: dict[str, Any]) -> None:
    if row.get("error"):
        tally.failed += 1
        reason = str(row["error"]).split(":", 1)[0]
        tally.errors[reason] = tally.errors.get(reason, 0) + 1
        return
    tally.answered += 1
    tally.malignant += bool(row["malignant"])
    tally.ood += row["ood"] is True


def summary(tally: Tally, total: int, skipped: int, elapsed: float, out: Path) -> str:
    sent = tally.answered + tally.failed
    lines = [
        f"{total} images: {tally.answered} classified, {tally.failed} failed, {skipped} already in {out}",
        f"{sent} sent in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):.1f} images/s); "
        f"{tally.malignant} above the malignancy threshold, {tally.ood} out-of-distribution",
    ]
    if tally.errors:
        lines.append("errors: " + ", ".join(f"{n} x {reason}" for reason, n in sorted(tally.errors.items())))
    return "\n".join(lines)
