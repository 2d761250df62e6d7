"""`manage.py screen_documents`: judge chunks whose stored safety verdict is
missing or of another policy version (chunks stored before verdicts were,
or after the checkers or rules changed); all of them with --all.

Not required: a turn screens such a chunk itself and stores its verdict.
This moves that cost out of the turns, in batches of DOCUMENTS_EMBED_BATCH.
"""
from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from documents import ingestion
from documents.models import Chunk
from safety import services as safety_services


class Command(BaseCommand):
    help = "Screen document chunks whose stored safety verdict is missing or of another policy (or --all of them)."

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", dest="everything", help="screen every chunk")

    def handle(self, *args, everything, **options):
        version = safety_services.policy_version()
        total = Chunk.objects.count() if everything else Chunk.objects.exclude(verdict_version=version).count()
        with tqdm(total=total, unit="chunk", file=self.stderr._out, disable=not total) as bar:
            done = ingestion.rescreen(everything=everything, progress=bar.update)
        self.stdout.write(f"{done} chunk(s) screened under safety policy {version}.")
