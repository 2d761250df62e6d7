"""`manage.py ingest USERNAME PATH...`: bulk-load files or folders into a user's library.

Each file is checked and stored like an upload, then indexed here, in this
process (no worker needed), with a progress bar over the files. A refused
file is reported and skipped; the others go on.
"""
from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from documents import ingestion, services
from documents.formats import TEXT_KINDS

SUFFIXES = {f".{s}" for s in TEXT_KINDS} | {".pdf", ".docx"}


def _files(paths: list[str]) -> list[Path]:
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise CommandError(f"{raw}: no such file or folder")
    return found


def _load(user, path: Path) -> str:
    """Store and index one file; the reason it was refused, or ""."""
    try:
        document = services.document_upload(user=user, name=path.name, data=path.read_bytes(), enqueue=False)
    except ValidationError as exc:
        return " ".join(exc.messages)
    try:
        ingestion.ingest(document_id=document.id)
    except ValidationError as exc:
        ingestion.mark_failed(document_id=document.id, reason=" ".join(exc.messages))
        return " ".join(exc.messages)
    return ""


class Command(BaseCommand):
    help = "Load files or folders (txt, md, pdf, html, docx, csv) into a user's document library."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("paths", nargs="+")

    def handle(self, *args, username, paths, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        files = _files(paths)
        failed = []
        with tqdm(files, unit="file", file=self.stderr._out, disable=not files) as bar:
            for path in bar:
                bar.set_postfix_str(path.name[:40])
                error = _load(user, path)
                if error:
                    failed.append(f"{path}: {error}")
        for line in failed:
            self.stderr.write(line)
        self.stdout.write(f"{len(files) - len(failed)} file(s) loaded into {username}'s library, {len(failed)} refused.")
