"""Text from a PR or a cluster, made safe to put in GitHub Markdown (comments, check run summaries).

What a failure names can carry attacker text: pod and container messages quote image names and Events
that templates render from the PR's branch or title, and a template's URL may be built from them too.
In Markdown such text could link elsewhere, mention people, embed HTML or break out of a table. Inside
a code span or a fenced code block GitHub renders none of that, so every such piece goes into one
whose fence is longer than any run of backticks in it; a URL is linked only when it is plainly one.
"""

from __future__ import annotations

import re
import unicodedata

# A URL worth a link: http(s), no spaces, quotes, angle brackets, backticks, pipes or parentheses.
SAFE_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&*+,;=%]+")
URL_MAX = 2000


def _printable(text: str, *, newlines: bool) -> str:
    """`text` without control and format characters (bidi overrides, zero-width ones); tabs become
    spaces, and newlines too unless kept."""
    out = []
    for char in text:
        if char == "\n" and newlines:
            out.append(char)
        elif char in "\t\r\n":
            out.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            continue
        else:
            out.append(char)
    return "".join(out)


def _fence(text: str, least: int) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(least, longest + 1)


def code(text: str, limit: int = 300) -> str:
    """`text` on one line as a code span (cut to `limit` characters): shown as typed, never rendered."""
    text = " ".join(_printable(text, newlines=False).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if not text:
        return "` `"
    fence = _fence(text, 1)
    if text.startswith("`") or text.endswith("`"):
        text = f" {text} "  # CommonMark strips one space each side, so the backticks stay text
    return f"{fence}{text}{fence}"


def cell(text: str, limit: int = 300) -> str:
    """A code span for a table cell: GFM splits cells on `|` even inside code spans unless escaped."""
    return code(text, limit).replace("|", "\\|")


def fenced(text: str, limit: int = 4000) -> str:
    """`text` as a fenced code block (cut to `limit` characters), lines kept."""
    text = _printable(text, newlines=True).strip("\n")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    fence = _fence(text, 3)
    return f"{fence}text\n{text}\n{fence}"


def safe_url(url: str | None) -> str | None:
    """`url` when it is plainly an http(s) URL (safe to link and to hand GitHub as a details URL)."""
    if url and len(url) <= URL_MAX and SAFE_URL.fullmatch(url):
        return url
    return None


def link(url: str) -> str:
    """A link to `url` when it is plainly one, else the text in a code span (no link)."""
    safe = safe_url(url)
    return f"<{safe}>" if safe else cell(url, URL_MAX)
