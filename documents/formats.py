"""What a file is, by its content, and its text.

`inspect` runs at upload, before anything is stored: the kind from the
bytes (magic numbers, never the name alone), and the checks that refuse a
file outright (encrypted or page-less PDFs, too many pages, zip bombs posing
as .docx, binary data posing as text). `extract` runs in the ingestion task
and yields sections: (page, heading, text), which chunks keep.
"""
from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser

import docx
from django.conf import settings
from django.core.exceptions import ValidationError
from pypdf import PdfReader

TEXT_KINDS = {"txt": "txt", "text": "txt", "md": "md", "markdown": "md", "csv": "csv", "html": "html", "htm": "html"}
KINDS = ("txt", "md", "pdf", "html", "docx", "csv")
DOCX_MAIN = "word/document.xml"


@dataclass(frozen=True)
class Inspected:
    kind: str
    pages: int  # PDF pages; 1 for the other formats


@dataclass(frozen=True)
class Section:
    page: int
    heading: str
    text: str


def inspect(name: str, data: bytes) -> Inspected:
    """The file's kind and page count, or a ValidationError saying what is wrong."""
    if not data:
        raise ValidationError("The file is empty.")
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if data.startswith(b"%PDF-"):
        return Inspected("pdf", _pdf_pages(data))
    if data.startswith(b"PK\x03\x04"):
        _check_docx(data)
        return Inspected("docx", 1)
    if suffix in ("pdf", "docx"):
        raise ValidationError(f"{name} is not a {suffix.upper()} file: its content does not start like one.")
    kind = TEXT_KINDS.get(suffix)
    if kind is None:
        raise ValidationError(f"{name}: unsupported format. Upload txt, md, pdf, html, docx or csv files.")
    _decode_text(data, name)
    return Inspected(kind, 1)


def _pdf_reader(data: bytes) -> PdfReader:
    try:
        reader = PdfReader(io.BytesIO(data))
    except Exception as exc:  # pypdf raises many kinds on a damaged file; each means "unreadable"
        raise ValidationError(f"The PDF could not be read ({exc}).") from None
    if reader.is_encrypted:
        raise ValidationError("The PDF is encrypted (password-protected). Upload an unprotected copy.")
    return reader


def _pdf_pages(data: bytes) -> int:
    reader = _pdf_reader(data)
    try:
        pages = len(reader.pages)
    except Exception as exc:  # as above
        raise ValidationError(f"The PDF could not be read ({exc}).") from None
    if pages == 0:
        raise ValidationError("The PDF has no pages.")
    if pages > settings.DOCUMENTS_MAX_PAGES:
        raise ValidationError(f"The PDF has {pages} pages; the limit is {settings.DOCUMENTS_MAX_PAGES}.")
    return pages


def _check_docx(data: bytes) -> None:
    """A .docx is a zip: refuse one whose members would inflate past the
    limit, or by a ratio no real document has (a decompression bomb), before
    anything decompresses it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise ValidationError("The file looks like a zip archive but is damaged.") from None
    if DOCX_MAIN not in {m.filename for m in members}:
        raise ValidationError("The zip archive is not a Word (.docx) document.")
    unzipped = sum(m.file_size for m in members)
    limit = settings.DOCUMENTS_MAX_UNZIPPED_MB * 2**20
    if unzipped > limit or unzipped > settings.DOCUMENTS_MAX_ZIP_RATIO * max(len(data), 1):
        raise ValidationError(
            f"The .docx would unpack to {unzipped / 2**20:.0f} MB from {len(data) / 2**20:.1f} MB: "
            "refused as a decompression bomb."
        )


def _decode_text(data: bytes, name: str = "The file") -> str:
    if b"\x00" in data:
        raise ValidationError(f"{name} contains binary data, not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError(f"{name} is not UTF-8 text.") from None


# ------------------------------------------------------------ extraction

def extract(kind: str, data: bytes) -> list[Section]:
    sections = _EXTRACTORS[kind](data)
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        what = "no text layer (a scan?)" if kind == "pdf" else "no text"
        raise ValidationError(f"The file has {what}: there is nothing to search.")
    return sections


def _pdf(data: bytes) -> list[Section]:
    reader = _pdf_reader(data)
    return [Section(i + 1, "", page.extract_text() or "") for i, page in enumerate(reader.pages)]


def _markdown(data: bytes) -> list[Section]:
    sections, heading, lines = [], "", []
    in_code = False
    for line in _decode_text(data).splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("#") and line.lstrip("#").startswith(" "):
            sections.append(Section(1, heading, "\n".join(lines)))
            heading, lines = line.lstrip("#").strip()[:200], []
        else:
            lines.append(line)
    return sections + [Section(1, heading, "\n".join(lines))]


def _txt(data: bytes) -> list[Section]:
    return [Section(1, "", _decode_text(data))]


def _csv(data: bytes) -> list[Section]:
    rows = list(csv.reader(io.StringIO(_decode_text(data))))
    if not rows:
        return []
    header = rows[0]
    lines = ["; ".join(f"{h}: {v}" for h, v in zip(header, row)) for row in rows[1:]]
    return [Section(1, ", ".join(header)[:200], "\n".join(lines))]


class _HtmlText(HTMLParser):
    """Text only: tags dropped, script/style/template content dropped, headings kept."""
    SKIP = {"script", "style", "template", "noscript", "svg", "head"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
    BLOCKS = {"p", "div", "br", "li", "tr", "section", "article", "pre", "blockquote", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.heading, self.parts, self.skip, self.in_heading = [], "", [], 0, False
        self.heading_parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.HEADINGS:
            self.sections.append(Section(1, self.heading, "".join(self.parts)))
            self.parts, self.heading_parts, self.in_heading = [], [], True
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.HEADINGS and self.in_heading:
            self.heading, self.in_heading = " ".join("".join(self.heading_parts).split())[:200], False

    def handle_data(self, data):
        if not self.skip:
            (self.heading_parts if self.in_heading else self.parts).append(data)


def _html(data: bytes) -> list[Section]:
    parser = _HtmlText()
    parser.feed(_decode_text(data))
    parser.close()
    return parser.sections + [Section(1, parser.heading, "".join(parser.parts))]


def _docx(data: bytes) -> list[Section]:
    document = docx.Document(io.BytesIO(data))
    sections, heading, lines = [], "", []
    for paragraph in document.paragraphs:
        if paragraph.style is not None and paragraph.style.name.lower().startswith(("heading", "title")):
            sections.append(Section(1, heading, "\n".join(lines)))
            heading, lines = paragraph.text.strip()[:200], []
        else:
            lines.append(paragraph.text)
    for table in document.tables:
        lines.extend(" | ".join(cell.text for cell in row.cells) for row in table.rows)
    return sections + [Section(1, heading, "\n".join(lines))]


_EXTRACTORS = {"pdf": _pdf, "md": _markdown, "txt": _txt, "csv": _csv, "html": _html, "docx": _docx}
