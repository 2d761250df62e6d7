"""`manage.py reindex_documents`: re-embed chunks after EMBEDDING_MODEL changed.

Chunks remember the model that embedded them; those of another model are
embedded again in batches (all of them with --all). The vector column is
384-dimensional: a model of another size needs a migration first.
"""
from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from documents import embedder, ingestion
from documents.models import Chunk


class Command(BaseCommand):
    help = "Re-embed document chunks made by another embedding model (or --all of them)."

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", dest="everything", help="re-embed every chunk")

    def handle(self, *args, everything, **options):
        model = embedder.model_name()
        total = Chunk.objects.count() if everything else Chunk.objects.exclude(embedding_model=model).count()
        with tqdm(total=total, unit="chunk", file=self.stderr._out, disable=not total) as bar:
            done = ingestion.reindex(everything=everything, progress=bar.update)
        self.stdout.write(f"{done} chunk(s) re-embedded with {model}.")
