"""A minimal PDF writer (Helvetica text, one string per line) for the
documents benchmark and tests: no PDF-writing library is installed, and
pypdf, which reads these, only edits existing PDFs."""
from __future__ import annotations

import textwrap

LINES_PER_PAGE = 48


def _escape(line: str) -> str:
    return line.encode("latin-1", "replace").decode("latin-1").replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string (lines wrapped at 90 characters, cut at LINES_PER_PAGE)."""
    n = len(pages)
    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
        3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for i, text in enumerate(pages):
        lines = [w for para in text.split("\n") for w in (textwrap.wrap(para, 90) or [""])][:LINES_PER_PAGE]
        stream = "BT /F1 10 Tf 14 TL 40 760 Td " + " ".join(f"({_escape(line)}) '" for line in lines) + " ET"
        objects[4 + 2 * i] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                              f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objects[5 + 2 * i] = f"<< /Length {len(stream.encode('latin-1'))} >>\nstream\n{stream}\nendstream"
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offsets[k]:010d} 00000 n \n" for k in sorted(objects)).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
