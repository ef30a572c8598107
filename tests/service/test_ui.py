"""The page at ``/`` (files, headers, LESIONSERVE_UI), the model card route, and the model-input image.

The page's behaviour in a browser is tested by tests/e2e/test_page_browser.py (Chromium).
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.ui.static import ASSETS, CSP
from tests.service.conftest import SIZE
from tests.tiny_model import make_tiny_onnx

Client = Callable[..., TestClient]
KEY = "k" * 24
CARD = """# Model card: tiny-test-model 0.0.1

## Intended use

Decision support. <script>alert(1)</script>

| metric | value |
|---|---:|
| `auc` | 0.9 |
"""


class Tags(HTMLParser):
    """Every tag name and attribute name in a document."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.add(tag)
        self.attributes.update(name for name, _ in attrs)


@pytest.fixture
def carded(tmp_path: Path) -> Path:
    """A tiny model with its card beside it, as ``python -m export`` leaves them."""
    model = make_tiny_onnx(tmp_path / "tiny.onnx", size=SIZE)
    model.with_suffix(".md").write_text(CARD)
    return model


def test_page_and_its_files_are_served_with_a_strict_csp(client_factory: Client) -> None:
    client = client_factory()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for r in [page, *(client.get(f"/ui/{name}") for name in ASSETS)]:
        assert r.status_code == 200, r.url
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    html = page.text
    # no inline script, style element or style attribute: the CSP would block them
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    tags = Tags()
    tags.feed(html)
    assert "style" not in tags.names and all(n != "style" and not n.startswith("on") for n in tags.attributes)
    # every file the page references is served, relative to the page (works under a path prefix)
    for ref in re.findall(r'(?:src|href)="(ui/[^"]+)"', html):
        assert client.get("/" + ref).status_code == 200, ref
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")


def test_only_the_pages_own_files_are_served(client_factory: Client) -> None:
    client = client_factory()
    for path in ["/ui/../config.py", "/ui/__init__.py", "/ui/static.py", "/ui/%2e%2e%2fapp.py", "/ui/"]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/problem+json"


def test_ui_false_turns_the_page_off(client_factory: Client) -> None:
    client = client_factory(ui=False)
    assert client.get("/").status_code == 404
    assert client.get("/ui/app.js").status_code == 404
    assert client.get("/healthz").status_code == 200  # the API is unchanged


def test_ui_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, settings_factory: Callable[..., object]
) -> None:
    monkeypatch.setenv("LESIONSERVE_UI", "false")
    assert settings_factory().ui is False  # type: ignore[attr-defined]


def test_the_page_needs_no_key_but_the_api_it_calls_does(client_factory: Client) -> None:
    client = client_factory(api_keys=f"ui:{KEY}")
    assert client.get("/").status_code == 200  # the page itself holds nothing: it asks for the key
    assert client.get("/v1/models/card").status_code == 401


def test_explain_returns_the_model_input_with_or_without_a_heatmap(client_factory: Client) -> None:
    client = client_factory()  # tiny model: no cam output
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = (200, 30, 30)  # RGB: the centre square is red, the sides black
    _, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    r = client.post("/v1/classify?explain=true", content=png.tobytes(), headers={"content-type": "image/png"})
    e = r.json()["explanation"]
    assert e["available"] is False and (e["width"], e["height"]) == (SIZE, SIZE)
    seen = cv2.imdecode(np.frombuffer(base64.b64decode(e["input_png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert seen.shape == (SIZE, SIZE, 3)
    assert np.abs(seen.reshape(-1, 3).mean(0) - (30, 30, 200)).max() < 2  # BGR: the centre crop, all red


def test_card_as_markdown_and_as_html(client_factory: Client, carded: Path) -> None:
    client = client_factory(model_path=carded)
    md = client.get("/v1/models/card")
    assert md.status_code == 200 and md.headers["content-type"] == "text/markdown; charset=utf-8"
    assert md.text == CARD
    page = client.get("/v1/models/card", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "<h1>Model card: tiny-test-model 0.0.1</h1>" in page.text
    assert '<td class="num">0.9</td>' in page.text
    assert "<script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_card_follows_the_keys(client_factory: Client, carded: Path) -> None:
    client = client_factory(model_path=carded, api_keys=f"ui:{KEY}")
    assert client.get("/v1/models/card").status_code == 401
    assert client.get("/v1/models/card", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_missing_card_is_a_problem_404(client_factory: Client, tmp_path: Path, tiny_onnx: Path) -> None:
    lone = shutil.copy(tiny_onnx, tmp_path / "lone.onnx")
    r = client_factory(model_path=Path(lone)).get("/v1/models/card")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/card-not-found") and "lone.md" in r.json()["detail"]


def test_a_card_for_another_model_is_not_served(client_factory: Client, carded: Path) -> None:
    carded.with_suffix(".md").write_text(CARD.replace("0.0.1", "9.9.9"))  # a stale card beside a new model
    r = client_factory(model_path=carded).get("/v1/models/card")
    assert r.status_code == 404
    assert "tiny-test-model 0.0.1" in r.json()["detail"] and "9.9.9" in r.json()["detail"]


def test_bundled_reference_card_renders() -> None:
    ref = Path(__file__).resolve().parents[2] / "models" / "reference.md"
    from service.ui.markdown import render

    html = render(ref.read_text())
    assert html.count("<table>") >= 5 and "<h2>Limitations</h2>" in html
    assert "<!--" not in html
    # The card's "reproduce" block is a fenced command (python -m export for 3.0.0, whose members came
    # from a GPU trip; python -m train for a CPU-trained reference): it must render as code.
    assert re.search(r"<pre><code>python -m (export|train) ", html)


def test_card_is_the_loaded_models_not_the_configured_paths(client_factory: Client, carded: Path) -> None:
    # After a hot swap the runtime serves another file than LESIONSERVE_MODEL_PATH: the card follows the model.
    from service.inference import OnnxModel

    loaded = OnnxModel.load(carded, ["CPUExecutionProvider"])
    client = client_factory(model=loaded)  # settings.model_path: the tiny model, with no card beside it
    assert client.get("/v1/models/card").text == CARD


def test_every_page_file_is_served_and_shipped_in_the_wheel() -> None:
    import fnmatch
    import tomllib

    from service.ui import static

    repo = Path(__file__).resolve().parents[2]
    files = {p.name for p in (repo / "service" / "ui").iterdir() if p.is_file() and p.suffix != ".py"}
    assert files == {static.INDEX, *ASSETS}  # a new file must be added to the served table
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service.ui"]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
