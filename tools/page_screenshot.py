"""Screenshot of the page at ``/`` after one upload, as in docs/img/page.png.

``python tools/page_screenshot.py --url http://127.0.0.1:8000 --image IMG --out docs/img/page.png [--phone]``
against a running service (``make run``). Drives Debian's Chromium through Playwright (``executable_path``;
no browser download), uploads IMG through the file input, waits for the answer, turns the heatmap on,
checks the page has no sideways scroll and no CSP violation, and saves a full-page PNG quantised to 256
colours (the page is flat colours around one small image, so this keeps it well under 300 kB).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

PHONE = {"width": 390, "height": 844}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--phone", action="store_true", help=f"{PHONE['width']} px wide, as a phone")
    ap.add_argument("--key", default="", help="API key, when the service has keys on")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()

    viewport = PHONE if a.phone else {"width": a.width, "height": 900}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=viewport, is_mobile=a.phone, device_scale_factor=2 if a.phone else 1)
        page.add_init_script(
            "window.__csp = []; document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective));"
        )
        page.goto(a.url.rstrip("/") + "/")
        if a.key:
            page.fill("#api-key", a.key)
            page.press("#api-key", "Enter")
        page.wait_for_selector("#model-line:has-text('Model ')")
        page.set_input_files("#file", str(a.image))
        page.wait_for_selector("#result:not([hidden]), #error:not([hidden])")
        if page.is_visible("#error"):
            print(f"error shown: {page.inner_text('#error')}", file=sys.stderr)
            return 1
        if not page.is_disabled("#heatmap-toggle"):
            page.check("#heatmap-toggle")
        page.evaluate("document.activeElement && document.activeElement.blur()")
        scroll, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        violations = page.evaluate("window.__csp")
        png = page.screenshot(full_page=True)
        browser.close()
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(a.out, optimize=True)
    print(f"{a.out}: {img.width}x{img.height}, {a.out.stat().st_size / 1024:.0f} kB; sideways scroll: "
          f"{scroll > client} ({scroll} vs {client} px); CSP violations: {violations or 'none'}")  # fmt: skip
    return 0 if scroll <= client and not violations else 1


if __name__ == "__main__":
    sys.exit(main())
