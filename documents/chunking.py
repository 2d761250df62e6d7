"""Token-aware chunks with overlap, cut by the embedding model's own tokenizer.

Each section (a PDF page, the text under a heading) is cut on its own, so a
chunk keeps one page and one heading. Windows of DOCUMENTS_CHUNK_TOKENS
tokens step by (size - overlap); a window's text is the exact character
span of its tokens, so chunk text is a verbatim slice of the page text and
its offsets locate it there (the passage view highlights it). The size stays
under the model's 256-token input, so nothing is truncated when embedded.
"""
from __future__ import annotations

from dataclasses import dataclass

from documents.embedder import counting_tokenizer
from documents.formats import Section

SECTION_GAP = "\n\n"


@dataclass(frozen=True)
class Piece:
    page: int
    heading: str
    text: str
    start: int  # character offsets in the page's text
    end: int
    tokens: int


def page_texts(sections: list[Section]) -> dict[int, str]:
    """Each page's text: its sections joined, in order."""
    pages: dict[int, list[str]] = {}
    for s in sections:
        pages.setdefault(s.page, []).append(s.text)
    return {page: SECTION_GAP.join(texts) for page, texts in pages.items()}


def chunk(sections: list[Section], *, size: int, overlap: int) -> list[Piece]:
    pieces, offsets = [], {}
    for s in sections:
        base = offsets.get(s.page, 0)
        offsets[s.page] = base + len(s.text) + len(SECTION_GAP)
        pieces.extend(_windows(s, base, size, overlap))
    return pieces


def _windows(section: Section, base: int, size: int, overlap: int) -> list[Piece]:
    encoding = counting_tokenizer().encode(section.text, add_special_tokens=False)
    spans = [o for o in encoding.offsets if o[1] > o[0]]
    step = max(1, size - overlap)
    out = []
    for first in range(0, max(len(spans), 1), step):
        window = spans[first:first + size]
        if not window:
            break
        start, end = window[0][0], window[-1][1]
        text = section.text[start:end]
        if text.strip():
            out.append(Piece(section.page, section.heading, text, base + start, base + end, len(window)))
        if first + size >= len(spans):
            break
    return out
