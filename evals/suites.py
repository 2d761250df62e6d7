"""The suites the project ships: one JSON file each under evals/data/.

A suite file: {"description", "threshold", "kind", "defaults": {request
parameters}, "checks": [checks every item gets], "items": [{"id", "prompt"
or "messages", "reference", "params", "checks", "kind"}]}. An item's kind
says how its request is built and its output read:

- "chat": the prompt as a user message, the reply as it is;
- "title": the chat title job's own prompt (conversations.tasks) and its
  cleanup and fallback, so the suite scores the titles users see;
- "safety": items with a "label" ("benign" or a harm category): harmful
  ones must be refused or blocked, benign ones answered.

The safety suite reads the safety app's labelled set (safety/data/
labelled.jsonl, one {"id", "text", "label", "tags"} per line) when it
exists, and its own small fallback set otherwise.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from evals import scorers

DATA_DIR = Path(__file__).resolve().parent / "data"
KINDS = ("chat", "title", "safety")


class SuiteError(ValueError):
    """A suite that does not exist, or a data file that is not a valid suite."""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    threshold: float
    items: list[dict] = field(repr=False)
    source: str = ""  # the file the items came from


def names() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def safety_labelled_path() -> Path:
    return Path(settings.BASE_DIR) / "safety" / "data" / "labelled.jsonl"


def load(name: str) -> Suite:
    if name not in names():
        raise SuiteError(f"No suite named {name!r}; the suites are: {', '.join(names())}")
    return _load(name, DATA_DIR / f"{name}.json")


def _load(name: str, path: Path) -> Suite:
    try:
        raw = json.loads(path.read_text())
        items, source = _items(raw, path)
        suite = Suite(name, raw.get("description", ""), float(raw["threshold"]), items, source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SuiteError(f"{path}: {exc}") from exc
    for item in suite.items:
        _validate(item, path)
    return suite


def _items(raw: dict, path: Path) -> tuple[list[dict], str]:
    kind = raw.get("kind", "chat")
    items, source = raw.get("items", []), str(path)
    if kind == "safety" and safety_labelled_path().exists():
        items, source = _read_jsonl(safety_labelled_path()), str(safety_labelled_path())
    if kind == "safety":
        items = _alternate(items)
    defaults, checks = raw.get("defaults", {}), raw.get("checks", [])
    return [_expand(item, kind, defaults, checks) for item in items], source


def _alternate(items: list[dict]) -> list[dict]:
    """Harmful and benign items in turn, and the harmful ones one category at a
    time, so that --limit N keeps both kinds and as many harm categories as N
    allows (the labelled set is grouped by category: its first 8 items held
    one category only)."""
    harmful = _round_robin([i for i in items if i.get("label", "benign") != "benign"])
    benign = [i for i in items if i.get("label", "benign") == "benign"]
    mixed = [item for pair in zip(harmful, benign) for item in pair]
    rest = harmful[len(benign):] or benign[len(harmful):]
    return mixed + rest


def _round_robin(items: list[dict]) -> list[dict]:
    """One item of each label in turn, labels in the order they first appear."""
    by_label: dict[str, list[dict]] = {}
    for item in items:
        by_label.setdefault(item.get("label", ""), []).append(item)
    rows = itertools.zip_longest(*by_label.values())
    return [item for row in rows for item in row if item is not None]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise SuiteError(f"{path}:{number}: {exc}") from exc
    return rows


def _expand(item: dict, kind: str, defaults: dict, checks: list[dict]) -> dict:
    item = {**item, "kind": item.get("kind", kind)}
    item["params"] = {**defaults, **item.get("params", {})}
    item["checks"] = [*checks, *item.get("checks", [])]
    if item["kind"] == "safety":
        item.setdefault("prompt", item.get("text", ""))
        harmful = item.get("label", "benign") != "benign"
        item["checks"] = [{"scorer": "refused" if harmful else "answered"}, *item["checks"]]
    item["id"] = str(item.get("id", ""))
    return item


def _validate(item: dict, path: Path) -> None:
    if not item["id"]:
        raise SuiteError(f"{path}: an item has no 'id'")
    if item["kind"] not in KINDS:
        raise SuiteError(f"{path}: item {item['id']}: kind must be one of {', '.join(KINDS)}")
    if not item.get("prompt") and not item.get("messages"):
        raise SuiteError(f"{path}: item {item['id']} has neither 'prompt' nor 'messages'")
    if not item["checks"]:
        raise SuiteError(f"{path}: item {item['id']} has no checks")
    for check in item["checks"]:
        try:
            scorers.validate(check)
        except scorers.BadCheck as exc:
            raise SuiteError(f"{path}: item {item['id']}: {exc}") from exc


def describe() -> list[tuple[str, int, float, str]]:
    """(name, items, threshold, description) of every suite, for --list and the admin."""
    return [(s.name, len(s.items), s.threshold, s.description) for s in map(load, names())]
