"""Replace one "## " section of a Markdown file, leaving the rest as it is."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, body: str) -> None:
    """Swap the section that starts with `heading` (up to the next "## " line) for
    `body` (which starts with the heading); append it when the file has none."""
    lines = path.read_text().splitlines() if path.exists() else []
    new = body.rstrip("\n").splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    else:
        lines += ([""] if lines and lines[-1] else []) + new
    path.write_text("\n".join(lines) + "\n")
