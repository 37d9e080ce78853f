"""The pieces every headstart page is made of: report.html, compare.html (html.py) and inspect.html
(inspection/page.py) share them, so the pages look alike and escape alike.

`page` wraps a body in the one stylesheet and a Content-Security-Policy (`default-src 'none'`; images
from data URIs only) that makes the browser refuse any fetch a future edit might add. Every string that
comes from the user's data goes through `esc`; a name that is not valid UTF-8 arrives with surrogates
and is shown as `\\xff`.
"""

from __future__ import annotations

import base64
import html
import io
from urllib.parse import quote

from PIL import Image

CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:0 auto;padding:1em 1.5em;color:#222}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.none{color:#666;font-style:italic}
table.facts th{background:#f6f6f6;white-space:nowrap;vertical-align:top}
table.cm td{text-align:right;min-width:2.2em}table.cm td.d{font-weight:bold}
table.cm th.c{writing-mode:vertical-rl;transform:rotate(180deg);vertical-align:bottom}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5em 1em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:160px;font-size:12px;overflow-wrap:anywhere}
.maps figure{width:310px}
.row{display:flex;gap:4px}
.p{white-space:nowrap}
figure img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
figure .missing{width:96px;height:96px;background:#eee;display:flex;align-items:center;font-size:11px}
img.plot{max-width:100%}
.muted{color:#666}
"""


def esc(value) -> str:
    """`value` as HTML text: undecodable bytes (surrogates) shown as \\xff escapes, then HTML-escaped."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make (e.g. from a JSON \\ud800)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def href(name: str) -> str:
    """A relative link to a file beside the page; quote() also makes '<', '"' and spaces harmless."""
    return esc(quote(name.encode("utf-8", "surrogateescape")))


class Markup(str):
    """Text already made HTML (its user strings escaped): `facts` places it as it is."""


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """A table of escaped cells; the columns in `numeric` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def facts(rows: list[list[str]]) -> str:
    """A two-column table of what and value; a value that is Markup is placed as it is, any other escaped."""
    return '<table class="facts">' + "".join(
        f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, Markup) else esc(v)}</td></tr>" for k, v in rows) + "</table>"


def words(text: str) -> Markup:
    """`text` that wraps only between words: a browser otherwise breaks a command after any hyphen (`--`)."""
    return Markup(" ".join(f'<span class="p">{esc(w)}</span>' for w in text.split(" ")))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def img(image: Image.Image, alt: str) -> str:
    """An <img> of `image`, inlined as a PNG data URI."""
    return f'<img alt="{esc(alt)}" src="{data_uri(png_bytes(image))}">'


def thumbnail(path: str, alt: str, side: int = 96, unreadable: str = "not readable") -> str:
    """An <img> of the image file at most `side` pixels a side, or a box saying why it cannot be read."""
    from headstart.data.images import ImageError, load_image  # decoded by the same rules as training

    try:
        image = load_image(path, min_side=side)  # a large JPEG decodes at a fraction of its size
    except (ImageError, OSError) as exc:  # moved or changed since: the page still lists the file
        return f'<div class="missing">{esc(unreadable)}: {esc(exc)}</div>'
    image.thumbnail((side, side))
    return img(image, alt)


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
