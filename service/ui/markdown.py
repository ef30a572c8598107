"""A small, safe Markdown subset to HTML: enough for a model card, nothing that can run in a browser.

Model cards are written by ``export/card.py`` and edited by people (``export.evaluate --card``), and
a card beside a model file is not code the service should trust. So there is no raw-HTML pass-through:
every character of the source reaches the output escaped, the only tags are the ones this module
writes, the only attributes are ``class`` (from a fixed set), ``href`` (``http``/``https`` only) and
``rel``. No new dependency: a full CommonMark library would also pass raw HTML through unless told not to.

Supported: ATX headings, paragraphs, ``-``/``*``/``1.`` lists (with indented continuation lines),
fenced code blocks, pipe tables with alignment, HTML comments (dropped), and inline code spans,
``**strong**``, ``*emphasis*``, ``[links](https://...)``, ``<https://...>``. An image is shown as its
alt text and path: the files a card links to (plots beside the model) are not served.
"""

from __future__ import annotations

import re
from html import escape

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)([-*]|\d{1,9}[.)])\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_INLINE = re.compile(
    r"(?P<tick>`+)(?P<code>.+?)(?P=tick)"
    r"|!\[(?P<alt>[^\]]*)\]\((?P<src>(?:[^()\s]|\([^()\s]*\))*)\)"  # a URL may hold balanced parentheses
    r"|\[(?P<text>[^\]]+)\]\((?P<href>(?:[^()\s]|\([^()\s]*\))+)\)"
    r"|<(?P<auto>https?://[^>\s]+)>"
    r"|\*\*(?P<strong>[^*]+?)\*\*"
    r"|(?<![\w*])\*(?P<em>[^*\s][^*]*?)\*(?![\w*])"
)
_SAFE_URL = re.compile(r"^https?://[^\s\"'<>]+$", re.IGNORECASE)


def _esc(text: str) -> str:
    return escape(text, quote=True)


def _link(href: str, label_html: str) -> str:
    if _SAFE_URL.match(href):
        return f'<a href="{_esc(href)}" rel="noopener noreferrer">{label_html}</a>'
    # Relative links point at files beside the model, which are not served; other schemes
    # (javascript:, data:) are never links. Keep the text and show where it pointed.
    return f"{label_html} (<code>{_esc(href)}</code>)"


def inline(text: str) -> str:
    """One line or paragraph of inline Markdown to HTML; everything not matched is escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(_esc(text[pos : m.start()]))
        pos = m.end()
        if m["tick"]:
            out.append(f"<code>{_esc(m['code'].strip())}</code>")
        elif m["src"] is not None:
            out.append(
                f'<span class="figure-ref">[figure: {_esc(m["alt"] or "untitled")}, <code>{_esc(m["src"])}</code>]</span>'
            )
        elif m["href"]:
            out.append(_link(m["href"], inline(m["text"])))
        elif m["auto"]:
            out.append(_link(m["auto"], _esc(m["auto"])))
        elif m["strong"]:
            out.append(f"<strong>{inline(m['strong'])}</strong>")
        else:
            out.append(f"<em>{inline(m['em'])}</em>")
    out.append(_esc(text[pos:]))
    return "".join(out)


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row.removeprefix("|").removesuffix("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def _table(rows: list[str]) -> str:
    head, rule, body = _cells(rows[0]), _cells(rows[1]), [_cells(r) for r in rows[2:]]
    align = [
        "num"
        if c.endswith(":") and not c.startswith(":")
        else "center"
        if c.startswith(":") and c.endswith(":")
        else ""
        for c in rule
    ]

    def row(cells: list[str], tag: str) -> str:
        cells = (cells + [""] * len(head))[: len(head)]
        parts = []
        for cell, a in zip(cells, align + [""] * len(head), strict=False):
            cls = f' class="{a}"' if a else ""
            parts.append(f"<{tag}{cls}>{inline(cell)}</{tag}>")
        return "<tr>" + "".join(parts) + "</tr>"

    body_html = "".join(row(r, "td") for r in body)
    return f'<div class="table-wrap"><table><thead>{row(head, "th")}</thead><tbody>{body_html}</tbody></table></div>'


def _list(items: list[tuple[bool, str]]) -> str:
    tag = "ol" if items[0][0] else "ul"
    return f"<{tag}>" + "".join(f"<li>{inline(text)}</li>" for _, text in items) + f"</{tag}>"


def _drop_comments(text: str) -> str:
    return re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)


def render(markdown: str) -> str:
    """The subset of Markdown above as an HTML fragment (no ``<html>``/``<body>``)."""
    lines = _drop_comments(markdown.replace("\r\n", "\n")).split("\n")
    html: list[str] = []
    para: list[str] = []
    items: list[tuple[bool, str]] = []

    def flush() -> None:
        if para:
            html.append(f"<p>{inline(' '.join(s.strip() for s in para))}</p>")
            para.clear()
        if items:
            html.append(_list(items))
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            flush()
            fence = _FENCE.match(line)[1]  # type: ignore[index]
            code = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                code.append(lines[i])
                i += 1
            html.append(f"<pre><code>{_esc(chr(10).join(code))}</code></pre>")
            i += 1
            continue
        if not line.strip():
            flush()
        elif heading := _HEADING.match(line):
            flush()
            level = len(heading[1])
            html.append(f"<h{level}>{inline(heading[2])}</h{level}>")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            flush()
            rows = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i])
                i += 1
            html.append(_table(rows))
            continue
        elif bullet := _BULLET.match(line):
            if para:
                flush()
            ordered = bullet[2][0].isdigit()
            if items and items[0][0] != ordered:
                flush()
            items.append((ordered, bullet[3]))
        elif items and line.startswith((" ", "\t")):
            ordered, text = items[-1]
            items[-1] = (ordered, f"{text} {line.strip()}")  # a list item's continuation line
        else:
            if items:
                flush()
            para.append(line)
        i += 1
    flush()
    return "\n".join(html)
