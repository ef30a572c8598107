"""The page at ``/`` in a real browser: Debian's Chromium driven by Playwright, against a real
``python -m service`` process (tiny model with the OOD and CAM outputs, its card beside it, API keys on).

Playwright is given ``executable_path`` (the Debian binary): nothing is downloaded, ``playwright
install`` is never run. Without Chromium or Playwright these tests skip with the reason, except
under CI (``CI`` set), where .ci/run installs Chromium and a skip would hide a broken page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, TEST_DATA, in_ci
from tests.deploy.conftest import stop_process, wait_http_ok
from tests.service.test_lifecycle import free_port
from tests.tiny_model import make_tiny_onnx

pytestmark = pytest.mark.slow

KEY = "page-test-key-0123456789"
JPEG = TEST_DATA / "isic" / "melanoma" / "ISIC_0000002.jpg"  # CC0 (tests/data/isic/ATTRIBUTION.txt)
DICOM = TEST_DATA / "dicom" / "ISIC_0000030_dermoscopic.dcm"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
PHONE = {"width": 390, "height": 844}


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; CI must have it (.ci/run installs chromium, make test installs playwright)")
    pytest.skip(reason)


def chromium_path() -> str:
    """The Debian Chromium binary (``CHROMIUM_BIN`` names another), or skip/fail with the reason."""
    candidates = [os.environ.get("CHROMIUM_BIN", ""), *CHROMIUM_PATHS, shutil.which("chromium") or ""]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    _missing("Chromium is not installed (Debian: apt-get install chromium)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``python -m service`` on a tiny model with OOD and CAM outputs and its card; API keys on."""
    tmp = tmp_path_factory.mktemp("page")
    model = make_tiny_onnx(tmp / "tiny.onnx", size=64, ood=True, cam=True)
    model.with_suffix(".md").write_text(
        "# Model card: tiny-test-model 0.0.1\n\n## Limitations\n\nA test fixture. <script>window.pwned=1</script>\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(
        LESIONSERVE_MODEL_PATH=str(model), LESIONSERVE_HOST="127.0.0.1", LESIONSERVE_PORT=str(port),
        LESIONSERVE_PROVIDERS="CPUExecutionProvider", LESIONSERVE_API_KEYS=f"page:{KEY}",
        LESIONSERVE_AUDIT_LOG="off", LESIONSERVE_LOG_LEVEL="WARNING",
    )  # fmt: skip
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/readyz", proc, tmp / "server.log")
        yield base
    finally:
        stop_process(proc, 20)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright; no browser download needed)")
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A browser page on the service that records console errors, page errors and CSP violations."""

    def __init__(self, browser: Any, base: str, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # Runs through the DevTools protocol, before the page's own script and outside its CSP.
        self.page.add_init_script(
            "window.__csp = [];"
            "document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        self.page.goto(base + "/")

    def csp_violations(self) -> list[str]:
        return list(self.page.evaluate("window.__csp"))

    def enter_key(self) -> None:
        self.page.wait_for_selector("#key-section:not([hidden])")
        self.page.focus("#api-key")
        self.page.keyboard.type(KEY)
        self.page.keyboard.press("Enter")
        self.page.wait_for_selector("#model-line:has-text('tiny-test-model 0.0.1')")

    def upload(self, path: Path) -> None:
        self.page.set_input_files("#file", str(path))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Page]:
    p = Page(browser, server)
    yield p
    p.close()


def api(server: str, path: Path, content_type: str, **params: str) -> httpx.Response:
    files = {"image": (path.name, path.read_bytes(), content_type)}
    return httpx.post(
        f"{server}/v1/classify", params=params, files=files, headers={"authorization": f"Bearer {KEY}"}, timeout=30
    )


def test_upload_shows_the_same_classes_as_the_api(page: Page, server: str, tmp_path: Path) -> None:
    p = page.page
    page.enter_key()
    page.upload(JPEG)
    p.wait_for_selector("#result:not([hidden])")
    shown = p.eval_on_selector_all(
        "#classes li", "items => items.map(li => [li.dataset.code, li.querySelector('.pct').textContent])"
    )
    answer = api(server, JPEG, "image/jpeg", explain="true").json()
    assert shown == [[c["code"], f"{c['probability'] * 100:.1f} %"] for c in answer["predictions"]]

    # plain words first; the engineering details folded, closed until asked for
    assert p.inner_text("#top-name") == answer["top"]["name"]
    assert "ExecutionProvider" not in p.inner_text("header") and "ExecutionProvider" not in p.inner_text("#verdict")
    assert p.get_attribute("#tech", "open") is None and not p.is_visible("#model-details")
    m = answer["malignancy"]
    verdict = p.inner_text("#malignancy-verdict")
    assert ("raised" in verdict and "not raised" not in verdict) if m["above_threshold"] else "not raised" in verdict
    reason = p.inner_text("#malignancy-reason")  # the reason: which classes add up to what, against what
    assert f"{m['threshold'] * 100:.1f} %" in reason and f"{m['score'] * 100:.1f} %" in reason
    names = {c["code"]: c["name"] for c in answer["predictions"]}
    assert all(names[c] in reason for c in m["classes"])
    assert "no" in p.inner_text("#ood-verdict") and "dermoscopic" in p.inner_text("#ood-reason")
    text = p.inner_text("#malignancy")
    assert ("Above threshold" if m["above_threshold"] else "Below threshold") in text
    assert f"{m['threshold'] * 100:.2f} %" in text and ("▲" in text) == m["above_threshold"]  # not colour alone
    p.click("#tech summary")  # unfold the technical details
    details = p.inner_text("#model-details") + p.inner_text("#request-details")
    assert "CPUExecutionProvider" in details
    assert answer["model"]["sha256"] in details and "total" in details
    rid = p.inner_text("#request-details dd.mono")
    assert len(rid) == 32 and rid != answer["request_id"]  # the page's own request, shown
    assert answer["ood"]["out_of_distribution"] is True  # the tiny model flags this image (see tests/tiny_model.py)
    assert "Result: most likely " + answer["top"]["name"] in p.inner_text("#summary")  # aria-live summary

    # the crop as the model saw it, and the heatmap over it
    src = p.get_attribute("#crop", "src")
    assert src == "data:image/png;base64," + answer["explanation"]["input_png_base64"]
    assert p.is_hidden("#heatmap-legend")
    p.focus("#heatmap-toggle")
    p.keyboard.press("Space")
    assert p.get_attribute("#crop", "src") == "data:image/png;base64," + answer["explanation"]["png_base64"]
    assert "heatmap" in (p.get_attribute("#crop", "alt") or "")
    # the legend says what the colours mean and which class the map explains
    assert p.is_visible("#heatmap-legend") and "red: strongest evidence" in p.inner_text("#heatmap-legend")
    assert answer["top"]["name"] in p.inner_text("#heatmap-explains")
    # the selector: another class's map, the same the API draws for it
    other = answer["predictions"][-1]["code"]
    p.select_option("#heatmap-class", other)
    p.wait_for_selector(f"#heatmap-explains:has-text('{names[other]}')")
    assert (
        p.get_attribute("#crop", "src")
        == "data:image/png;base64,"
        + api(server, JPEG, "image/jpeg", explain_class=other).json()["explanation"]["png_base64"]
    )

    # the whole image, with the square the model saw drawn where the service cut it
    assert (p.get_attribute("#whole", "src") or "").startswith("blob:")
    p.wait_for_function("document.getElementById('whole').complete")
    whole = p.eval_on_selector(
        "#whole", "e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }"
    )
    box = p.eval_on_selector(
        "#crop-box", "e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }"
    )
    w, h = answer["image"]["width"], answer["image"]["height"]
    side = min(w, h)
    scale = whole[2] / w
    expected = [whole[0] + (w - side) / 2 * scale, whole[1] + (h - side) / 2 * scale, side * scale, side * scale]
    assert all(abs(a - b) <= 2 for a, b in zip(box, expected, strict=True)), (box, expected)
    assert "outlined centre square" in p.inner_text("#whole-caption")

    p.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert page.csp_violations() == [] and page.errors == []
    assert not [m for m in page.console if "Content Security Policy" in m or "Refused" in m], page.console


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [
        ("notes.txt", b"not an image at all\n", "text/plain"),  # 415
        ("photo.jpg", b"\xff\xd8 truncated", "image/jpeg"),  # 400
        ("huge.jpg", b"\xff\xd8" + bytes(21 * 1024 * 1024), "image/jpeg"),  # 413: over the 20 MiB default
    ],
    ids=["text-file", "broken-jpeg", "too-large"],
)
def test_bad_upload_shows_the_problem_the_api_returned(
    page: Page, server: str, tmp_path: Path, name: str, data: bytes, content_type: str
) -> None:
    p = page.page
    page.enter_key()
    page.upload(JPEG)  # a good result first: it must not stay on screen beside the error
    p.wait_for_selector("#result:not([hidden])")
    bad = tmp_path / name
    bad.write_bytes(data)
    page.upload(bad)
    p.wait_for_selector("#error:not([hidden])")
    problem = api(server, bad, content_type).json()
    assert p.inner_text("#error-title") == problem["title"]
    # the multipart envelope differs between Chromium and httpx by a few bytes of boundary
    envelope = re.compile(r"the body is \d+ bytes")
    assert envelope.sub("", p.inner_text("#error-detail")) == envelope.sub("", problem["detail"])
    assert f"HTTP {problem['status']}" in p.inner_text("#error-meta")
    assert p.is_hidden("#result")
    assert p.get_attribute("#error", "role") == "alert"
    assert page.csp_violations() == [] and page.errors == []


def test_without_a_key_the_page_asks_for_one_and_shows_the_401(page: Page) -> None:
    p = page.page
    p.wait_for_selector("#key-section:not([hidden])")
    page.upload(JPEG)
    p.wait_for_selector("#error:not([hidden])")
    assert p.inner_text("#error-title") == "Missing or invalid API key"
    assert p.evaluate("document.activeElement.id") == "api-key"


def test_keyboard_only(page: Page) -> None:
    p = page.page
    # Playwright turns on Chromium's file-chooser interception when the first listener subscribes, without
    # waiting for it; subscribed only inside expect_file_chooser, a loaded CI machine pressed Space first and
    # the chooser was never seen (CI, 2026-12-04). Subscribing here leaves the Tab presses below to settle it.
    p.on("filechooser", lambda _chooser: None)
    page.enter_key()
    # Tab from the top of the page reaches the file input (visually the drop zone) ...
    for _ in range(10):
        p.keyboard.press("Tab")
        if p.evaluate("document.activeElement.id") == "file":
            break
    assert p.evaluate("document.activeElement.id") == "file"
    assert p.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") != "none"  # focus is visible
    # ... and Space opens the file chooser
    with p.expect_file_chooser() as chooser:
        p.keyboard.press("Space")
    chooser.value.set_files(str(JPEG))
    p.wait_for_selector("#result:not([hidden])")
    # the model card opens in a dialog from the keyboard, with the card's script shown as text, never run
    p.focus("#card-link")
    p.keyboard.press("Enter")
    p.wait_for_selector("#card-body h1:has-text('Model card: tiny-test-model 0.0.1')")
    assert "<script>window.pwned=1</script>" in p.inner_text("#card-body")
    assert p.evaluate("window.pwned") is None
    p.keyboard.press("Escape")
    assert not p.evaluate("document.getElementById('card-dialog').open")
    assert page.csp_violations() == [] and page.errors == []


def test_dicom_shows_its_uids(page: Page, server: str) -> None:
    p = page.page
    page.enter_key()
    page.upload(DICOM)
    p.wait_for_selector("#result:not([hidden])")
    p.click("#tech summary")
    p.wait_for_selector("#dicom:not([hidden])")
    ids = api(server, DICOM, "application/dicom").json()["dicom"]["identifiers"]
    shown = p.inner_text("#dicom-details")
    assert ids and all(uid in shown for uid in ids.values()), (ids, shown)
    assert p.get_attribute("#crop", "src", timeout=5000).startswith("data:image/png;base64,")  # decoded by the service
    assert p.is_hidden("#whole-figure")  # a browser cannot show a DICOM file: the service's crop stands in
    assert "cannot show a DICOM file whole" in p.inner_text("#crop-caption")


def test_paste_and_drop(page: Page) -> None:
    p = page.page
    page.enter_key()
    data = list(JPEG.read_bytes())
    make_event = """([bytes, kind]) => {
        const file = new File([new Uint8Array(bytes)], 'lesion.jpg', {type: 'image/jpeg'});
        const dt = new DataTransfer();
        dt.items.add(file);
        if (kind === 'paste') document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}));
        else document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }"""
    for kind in ("paste", "drop"):
        p.evaluate("document.getElementById('status').textContent = ''")
        p.evaluate(make_event, [data, kind])
        p.wait_for_selector("#status:has-text('Classified lesion.jpg')")
        assert p.is_visible("#result")


def test_phone_width_has_no_sideways_scroll(browser: Any, server: str, tmp_path: Path) -> None:
    page = Page(browser, server, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        p = page.page
        page.enter_key()
        page.upload(JPEG)
        p.wait_for_selector("#result:not([hidden])")
        width = p.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], width
        assert p.eval_on_selector("#crop", "img => img.getBoundingClientRect().width") <= PHONE["width"]
        p.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        assert page.csp_violations() == [] and page.errors == []
    finally:
        page.close()


def test_the_csp_is_enforced_in_the_browser(page: Page) -> None:
    # the control for every "no violations" check above: an inline script is refused, and reported
    p = page.page
    p.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.ran = 1'; document.body.append(s); }"
    )
    p.wait_for_function("window.__csp.length > 0")
    assert p.evaluate("window.ran") is None
    assert any(v.startswith("script-src") for v in page.csp_violations())


def test_missing_chromium_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM_PATHS", ())
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CHROMIUM_BIN", raising=False)
    for ci, outcome in (("", pytest.skip.Exception), ("true", pytest.fail.Exception)):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(BaseException, match="Chromium is not installed") as raised:
            chromium_path()
        assert raised.type is outcome
