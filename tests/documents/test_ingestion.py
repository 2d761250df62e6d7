"""The ingestion task (progress, retries, the reason of a failure), the
`ingest` and `reindex_documents` commands, and the worker's embedder."""
import io

import numpy as np
import pytest
from django.core.management import call_command

from documents import embedder, ingestion, services
from documents.models import Chunk, Document
from tests.documents.conftest import PRIDE, pdf

pytestmark = pytest.mark.django_db


def test_progress_counts_embedded_chunks_batch_by_batch(alice, upload, settings, monkeypatch):
    settings.DOCUMENTS_EMBED_BATCH = 1
    seen = []
    real = embedder.embed_batch

    def watching(texts):
        seen.append(Document.objects.values_list("status", "chunks_done", "chunks_total").get())
        return real(texts)

    monkeypatch.setattr(embedder, "embed_batch", watching)
    document = upload(alice, "novel.pdf", pdf(PRIDE, "Longbourn.", "Netherfield."))
    assert seen == [("processing", 0, 3), ("processing", 1, 3), ("processing", 2, 3)]
    assert (document.status, document.chunks_done, document.progress_percent) == ("ready", 3, 100)


def test_a_passing_fault_is_retried(alice, upload, monkeypatch):
    calls = {"n": 0}
    real = embedder.embed_batch

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("database went away")
        return real(texts)

    monkeypatch.setattr(embedder, "embed_batch", flaky)
    document = upload(alice, "a.txt", b"Jane is the eldest.")
    assert document.status == "ready" and document.error == "" and calls["n"] == 2


def test_a_lasting_fault_ends_in_failed_with_the_reason(alice, upload, store, monkeypatch, settings):
    def broken(texts):
        raise ConnectionError("object store unreachable")

    monkeypatch.setattr(embedder, "embed_batch", broken)
    document = upload(alice, "a.txt", b"Jane is the eldest.")
    assert document.status == "failed"
    assert document.error == "Indexing failed after 3 tries: ConnectionError: object store unreachable"
    assert store() == set() and not Chunk.objects.filter(document=document).exists()


def test_the_ingest_command_loads_files_and_folders_with_a_progress_bar(alice, tmp_path, store):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("Lydia runs off with Wickham.")
    (folder / "sub" / "two.md").write_text("# Rosings\nLady Catherine lives at Rosings.")
    (folder / "ignored.bin").write_bytes(b"\0\1")
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf")
    (tmp_path / "novel.pdf").write_bytes(pdf(PRIDE))
    out, err = io.StringIO(), io.StringIO()
    call_command("ingest", "alice", str(folder), str(tmp_path / "bad.pdf"), str(tmp_path / "novel.pdf"), stdout=out, stderr=err)
    assert "3 file(s) loaded into alice's library, 1 refused." in out.getvalue()
    assert "bad.pdf: bad.pdf is not a PDF file" in err.getvalue()
    assert "file/s" in err.getvalue() or "it/s" in err.getvalue() or "3/4" in err.getvalue() or "4/4" in err.getvalue()
    documents = Document.objects.filter(user=alice, conversation=None)
    assert sorted(documents.values_list("name", "status")) == [("novel.pdf", "ready"), ("one.txt", "ready"), ("two.md", "ready")]


def test_the_ingest_command_refuses_an_unknown_user(tmp_path):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no user named 'nobody'"):
        call_command("ingest", "nobody", str(tmp_path))


def test_reindex_embeds_again_the_chunks_of_another_model(alice, upload):
    upload(alice, "a.txt", b"Jane is the eldest.")
    upload(alice, "b.txt", b"Mary reads.")
    Chunk.objects.filter(document__name="a.txt").update(embedding_model="old-model", embedding=[0.0] * 384)
    out = io.StringIO()
    call_command("reindex_documents", stdout=out, stderr=io.StringIO())
    assert out.getvalue().startswith("1 chunk(s) re-embedded")
    assert not Chunk.objects.exclude(embedding_model=embedder.model_name()).exists()
    assert np.linalg.norm(Chunk.objects.get(document__name="a.txt").embedding) == pytest.approx(1.0, abs=1e-4)


def test_the_workers_numpy_embedder_matches_sentence_transformers():
    from retrieval.services import embed

    texts = ["Mr. Bennet lives at Longbourn.", "A short one", "It is a truth universally acknowledged " * 20]
    ours = np.array(embedder.embed_batch(texts))
    theirs = np.array(embed(texts))
    assert (ours * theirs).sum(axis=1).min() > 0.9999


def test_the_embedder_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'chatapp.settings'); django.setup();"
            "from documents import embedder, tasks; embedder.embed_batch(['hello']); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr[-2000:]
