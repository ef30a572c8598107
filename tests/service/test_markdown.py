"""The model card's Markdown renderer: the subset a card uses, and nothing in a card can run in a browser."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ui.markdown import inline, render

ALLOWED_TAGS = {
    "h1", "h2", "h3", "h4", "h5", "h6", "p", "ul", "ol", "li", "pre", "code", "strong", "em", "a", "span",
    "div", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_CLASSES = {"num", "center", "table-wrap", "figure-ref"}


class Audit(HTMLParser):
    """Every element and attribute of a fragment, with the values that could carry script."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(name, value or "") for name, value in attrs]

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def audit(html: str) -> Audit:
    a = Audit()
    a.feed(html)
    a.close()
    return a


def assert_inert(html: str) -> None:
    a = audit(html)
    assert set(a.tags) <= ALLOWED_TAGS, set(a.tags) - ALLOWED_TAGS
    assert not a.comments
    for name, value in a.attrs:
        assert name in ("class", "href", "rel"), name
        if name == "href":
            assert value.lower().startswith(("https://", "http://")), value
        if name == "class":
            assert value in ALLOWED_CLASSES, value


ATTACKS = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    '[x](https://ok.example/" onmouseover="alert(1))',
    '![a" onerror="alert(1)](x.png)',
    '<https://a.example/"><script>alert(1)</script>>',
    "# <svg onload=alert(1)>",
    "| <iframe src=//evil> | x |\n|---|---|\n| <b onclick=a()>1</b> | 2 |",
    "- <a href='javascript:x'>item</a>\n  continued <script>",
    "```\n</code></pre><script>alert(1)</script>\n```",
    "<!-- a --><script>alert(1)</script><!-- b -->",
    "`<script>` **<em onclick=x>bold</em>** *<i>em</i>*",
    "<!-- unterminated <script>alert(1)</script>",
]


@pytest.mark.parametrize("source", ATTACKS)
def test_script_injection_stays_text(source: str) -> None:
    html = render(source)
    assert_inert(html)
    lowered = html.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<iframe" not in lowered and "<svg" not in lowered


def test_unsafe_links_keep_their_text_but_are_not_links() -> None:
    html = render("[click](javascript:alert(1)) and [plot](reference-eval/roc.png)")
    assert "<a " not in html
    assert "click (<code>javascript:alert(1)</code>)" in html and "plot (<code>reference-eval/roc.png</code>)" in html


def test_the_subset_a_model_card_uses() -> None:
    source = """# Model card: reference 2.0.0

File `reference.onnx` (20.3 MB), **held-out** and *calibrated*;
second line of the same paragraph.

<!-- held-out evaluation: start -->
## Classes

| column | code | malignant |
|---:|---|:---:|
| 0 | `akiec` | yes |
| 1 | `bkl` |  |

- first item
  continued here
- second [HAM10000](https://doi.org/10.1038/sdata.2018.161)

1. one
2. two

```
python -m export a.pt --out b.onnx \\
  --tta dihedral
```

![roc](reference-eval/roc.png)
"""
    html = render(source)
    assert_inert(html)
    assert "<h1>Model card: reference 2.0.0</h1>" in html and "<h2>Classes</h2>" in html
    assert (
        "<p>File <code>reference.onnx</code> (20.3 MB), <strong>held-out</strong> and <em>calibrated</em>; second line"
        in html
    )
    assert '<th class="num">column</th><th>code</th><th class="center">malignant</th>' in html
    assert '<tr><td class="num">1</td><td><code>bkl</code></td><td class="center"></td></tr>' in html
    assert "<ul><li>first item continued here</li><li>second " in html
    assert '<a href="https://doi.org/10.1038/sdata.2018.161" rel="noopener noreferrer">HAM10000</a>' in html
    assert "<ol><li>one</li><li>two</li></ol>" in html
    assert "<pre><code>python -m export a.pt --out b.onnx \\\n  --tta dihedral</code></pre>" in html
    assert '<span class="figure-ref">[figure: roc, <code>reference-eval/roc.png</code>]</span>' in html
    assert "held-out evaluation" not in html


def test_identifiers_with_underscores_and_stars_are_not_emphasis() -> None:
    assert (
        inline("balanced_accuracy and 2*3*4 and snake_case_name") == "balanced_accuracy and 2*3*4 and snake_case_name"
    )


TOKENS = [*"<>\"'`*_[]()!#|-:=/ \n\tajs", "javascript:", "http://", "https://x", "<!--", "-->", "```", "on", "| --- |"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_any_text_renders_inert(source: str) -> None:
    assert_inert(render(source))
