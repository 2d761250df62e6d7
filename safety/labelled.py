"""The labelled set (safety/data/labelled.jsonl) and its fixed split.

One JSON object per line: {"id", "text", "label", "tags"}; `label` is
"benign" or a category of safety.taxonomy.HEAD_LABELS. Variants of one item
(ids "inj-004.base64", "inj-004.leet", ...) share a group, the part before
the first ".", and a group is wholly in one split, so the held-out figures
never score a re-spelling of a training item.

The held-out split: every item tagged "fresh" (written after the rules and
the head were settled, to check them on text neither was shaped on) and
about 30% of the other groups, chosen by a hash of the group id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safety.taxonomy import HEAD_LABELS

PATH = Path(__file__).resolve().parent / "data" / "labelled.jsonl"
HELD_OUT_PERCENT = 30


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    label: str
    tags: tuple[str, ...]

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def held_out(self) -> bool:
        if "fresh" in self.tags:
            return True
        return int(hashlib.sha256(self.group.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def load(path: Path = PATH) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["label"] not in HEAD_LABELS:
            raise ValueError(f"{path}:{number}: unknown label {row['label']!r}")
        items.append(Item(row["id"], row["text"], row["label"], tuple(row.get("tags", ()))))
    return items


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(training items, held-out items)."""
    return [i for i in items if not i.held_out], [i for i in items if i.held_out]
