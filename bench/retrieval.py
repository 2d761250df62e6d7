"""Document retrieval: quality on a built-in QA set, ingestion and search speed.

Writes "## Retrieval (bench.retrieval)" of docs/BENCHMARKS.md. Runs on a
fresh temporary DATA_DIR (embedded Postgres and Redis), in four parts:

1. quality: the public-domain texts in bench/data (four files, four formats)
   go into a library; each question of bench/data/retrieval_qa.json is
   searched by vector, full text and hybrid; a hit is right when it is a
   chunk of the question's file holding the answer's phrase. recall@5 and MRR.
   Then a sample is answered by the bundled SmolLM2 with the passages in its
   system message, as a turn gives them: the share of replies that cite
   ([n]) a passage of the right file.
2. ingestion: a PDF of N pages through extract → chunk → embed (the worker's
   numpy embedder, DOCUMENTS_EMBED_THREADS threads) → store. Pages per second.
3. search at scale: --chunks synthetic chunks (random unit vectors; 50 words
   each from a 20,000-word synthetic vocabulary) in one user's library, HNSW
   built after the load; p50/p99 of each search mode.
4. TTFT added by retrieval: `documents.context.passages_for_turn` as a turn
   runs it (embed the question, scope, hybrid search, safety screen, fit the
   budget with the model's tokenizer), on the QA library and on the large one.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.chat import _stop_services, setup_django
from bench.pdfgen import make_pdf
from bench.report import ROOT, percentile

SECTION = "## Retrieval (bench.retrieval)"
DATA = ROOT / "bench" / "data"
CORPUS = ["pride_and_prejudice_ch1.txt", "gettysburg_address.txt", "us_constitution_opening.md",
          "declaration_of_independence_opening.html"]
MODES = ("vector", "text", "hybrid")


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


# ------------------------------------------------------------ 1. quality

def _load_corpus(user, chunk_tokens: int):
    from django.conf import settings

    from documents import ingestion, services

    settings.DOCUMENTS_CHUNK_TOKENS, settings.DOCUMENTS_CHUNK_OVERLAP_TOKENS = chunk_tokens, chunk_tokens // 6
    for name in CORPUS:
        document = services.document_upload(user=user, name=name, data=(DATA / name).read_bytes(), enqueue=False)
        ingestion.ingest(document_id=document.id)


def _relevant(hit, qa) -> bool:
    return hit.document == qa["file"] and _norm(qa["answer"]) in _norm(hit.text)


def _quality(user, qas) -> dict:
    from documents import selectors
    from retrieval.services import embed

    scope = selectors.Scope(user_id=user.id, conversation_id=None, use_library=True)
    out = {}
    for mode in MODES:
        ranks = []
        for qa in qas:
            hits = selectors.search(scope=scope, query=qa["q"], vector=embed([qa["q"]])[0], top_k=5, mode=mode)
            ranks.append(next((i for i, h in enumerate(hits, start=1) if _relevant(h, qa)), None))
        out[mode] = {"recall@5": sum(r is not None for r in ranks) / len(qas),
                     "mrr": sum(1 / r for r in ranks if r) / len(qas)}
    return out


def _citations(user, conversation, qas, sample: int) -> dict:
    """The bundled model answers with the passages a turn would give it."""
    import torch
    from django.conf import settings
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from documents import context
    from inference.bootstrap import resolve_model

    path = resolve_model("bundled:smollm2", settings.MODELS_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    counted = _counter(tokenizer)
    cited_any = cited_right = 0
    examples = []
    for qa in qas[:sample]:
        passages = context.passages_for_turn(user_id=user.id, conversation_id=conversation.id, query=qa["q"],
                                             prompt_budget_tokens=8192 - 512, count_tokens=counted)
        messages = [{"role": "system", "content": passages.text}, {"role": "user", "content": qa["q"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=80, do_sample=False)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        numbers = {int(n) for n in re.findall(r"\[(\d+)\]", reply)}
        files = {i["document"] for i in passages.items if i["n"] in numbers}
        cited_any += bool(numbers)
        cited_right += qa["file"] in files
        examples.append((qa["q"], " ".join(reply.split())[:160]))
    return {"n": min(sample, len(qas)), "cited": cited_any, "right": cited_right, "examples": examples[:3]}


def _counter(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True))
    return count


# ------------------------------------------------------------ 2. ingestion

def _ingestion(user, pages: int) -> dict:
    from django.conf import settings

    from documents import chunking, formats, ingestion, services

    settings.DOCUMENTS_CHUNK_TOKENS, settings.DOCUMENTS_CHUNK_OVERLAP_TOKENS = 200, 40
    settings.DOCUMENTS_MAX_PAGES = max(settings.DOCUMENTS_MAX_PAGES, pages)
    text = (DATA / "pride_and_prejudice_ch1.txt").read_text()
    words = text.split() * (pages * 400 // len(text.split()) + 1)  # the chapter, over and over
    data = make_pdf([" ".join(words[i * 400:(i + 1) * 400]) for i in range(pages)])
    started = time.perf_counter()
    sections = formats.extract("pdf", data)
    extracted = time.perf_counter()
    pieces = chunking.chunk(sections, size=200, overlap=40)
    chunked = time.perf_counter()
    document = services.document_upload(user=user, name="bench.pdf", data=data, enqueue=False)
    t0 = time.perf_counter()
    ingestion.ingest(document_id=document.id)
    total = time.perf_counter() - t0
    return {"pages": pages, "chunks": len(pieces), "seconds": total, "pages_per_s": pages / total,
            "extract_s": extracted - started, "chunk_s": chunked - extracted,
            "threads": settings.DOCUMENTS_EMBED_THREADS, "mb": len(data) / 2**20}


# ------------------------------------------------------------ 3. search at scale

def _synthetic_library(n: int) -> tuple:
    """One user's library of `n` chunks; the HNSW index rebuilt after the load."""
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.db import connection

    from documents.models import Document

    user = get_user_model().objects.create_user("big")
    document = Document.objects.create(user=user, name="synthetic", kind="txt", storage_key="", size_bytes=0,
                                       status="ready", chunks_total=n, chunks_done=n)
    rng = np.random.default_rng(0)
    vocabulary = [f"lex{i:05d}" for i in range(20000)]
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX IF EXISTS chunk_embedding_hnsw")
        with cursor.copy('COPY documents_chunk (document_id, user_id, ordinal, page, heading, text, start, "end", '
                         'tokens, embedding, embedding_model) FROM STDIN') as copy:
            for i in range(n):
                words = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), 50))
                vector = "[" + ",".join(f"{x:.6f}" for x in vectors[i]) + "]"
                copy.write_row((str(document.id), user.id, i, 1, "", words, 0, len(words), 60, vector, "synthetic"))
        started = time.perf_counter()
        cursor.execute("SET maintenance_work_mem = '1GB'")
        cursor.execute("CREATE INDEX chunk_embedding_hnsw ON documents_chunk USING hnsw (embedding vector_cosine_ops) "
                       "WITH (m = 16, ef_construction = 64)")
        cursor.execute("ANALYZE documents_chunk")
        build_s = time.perf_counter() - started
    return user, vectors, vocabulary, build_s


def _speed(user, vectors, vocabulary, queries: int) -> dict:
    import numpy as np

    from documents import selectors

    rng = np.random.default_rng(1)
    scope = selectors.Scope(user_id=user.id, conversation_id=None, use_library=True)
    out = {}
    for mode in MODES:
        times = []
        for i in range(queries + 10):
            target = vectors[rng.integers(0, len(vectors))] + 0.05 * rng.standard_normal(384).astype(np.float32)
            query = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), 5))
            started = time.perf_counter()
            selectors.search(scope=scope, query=query, vector=(target / np.linalg.norm(target)).tolist(), mode=mode)
            if i >= 10:  # warm-up
                times.append((time.perf_counter() - started) * 1000)
        out[mode] = (percentile(times, 0.5), percentile(times, 0.99))
    return out


# ------------------------------------------------------------ 4. TTFT added by retrieval

def _turn_overhead(user, conversation, questions: list[str], rounds: int) -> tuple[float, float]:
    from django.conf import settings
    from transformers import AutoTokenizer

    from documents import context
    from inference.bootstrap import resolve_model

    count = _counter(AutoTokenizer.from_pretrained(resolve_model("bundled:smollm2", settings.MODELS_DIR)))
    times = []
    for i in range(rounds + 5):
        started = time.perf_counter()
        context.passages_for_turn(user_id=user.id, conversation_id=conversation.id, query=questions[i % len(questions)],
                                  prompt_budget_tokens=8192 - 512, count_tokens=count)
        if i >= 5:
            times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 0.5), percentile(times, 0.99)


# ------------------------------------------------------------ the report

def _measure(args) -> dict:
    from django.contrib.auth import get_user_model

    from conversations import services as chat_services
    from documents import services

    qas = json.loads((DATA / "retrieval_qa.json").read_text())
    reader = get_user_model().objects.create_user("reader")
    _load_corpus(reader, args.chunk_tokens)
    chat = chat_services.conversation_create(user=reader)
    services.chat_use_library(conversation_id=chat.id, on=True)
    results = {"qa": len(qas), "quality": _quality(reader, qas)}
    results["turn_small"] = _turn_overhead(reader, chat, [q["q"] for q in qas], args.queries // 2)
    results["citations"] = _citations(reader, chat, random.Random(0).sample(qas, len(qas)), args.cite_sample) \
        if args.cite_sample else None
    results["ingestion"] = _ingestion(reader, args.pdf_pages)
    big, vectors, vocabulary, build_s = _synthetic_library(args.chunks)
    results["build_s"] = build_s
    results["speed"] = _speed(big, vectors, vocabulary, args.queries)
    big_chat = chat_services.conversation_create(user=big)
    services.chat_use_library(conversation_id=big_chat.id, on=True)
    results["turn_big"] = _turn_overhead(big, big_chat, [q["q"] for q in qas], args.queries // 2)
    return results


def _tables(r: dict, args) -> str:
    q = r["quality"]
    quality = report.table(["search", "recall@5", "MRR"], [
        (mode, f"{q[mode]['recall@5']:.2f}", f"{q[mode]['mrr']:.2f}") for mode in MODES])
    ing = r["ingestion"]
    s = r["speed"]
    speed = report.table(["what", "measured", "goal"], [
        (f"ingestion, a {ing['pages']}-page PDF ({ing['mb']:.1f} MB, {ing['chunks']} chunks of 200 tokens), "
         f"{ing['threads']} embedding thread", f"{ing['pages_per_s']:.1f} pages/s ({ing['seconds']:.1f} s; "
         f"extract {ing['extract_s']:.2f} s, chunk {ing['chunk_s']:.2f} s, the rest embedding and storing)", "—"),
        *[(f"{mode} search, {args.chunks:,} chunks in scope, p50 / p99", f"{s[mode][0]:.1f} / {s[mode][1]:.1f} ms",
           "≤ 30 ms p50" if mode == "hybrid" else "—") for mode in MODES],
        (f"HNSW build after loading {args.chunks:,} chunks", f"{r['build_s']:.0f} s", "—"),
        ("TTFT added by retrieval in a turn, QA library, p50 / p99", f"{r['turn_small'][0]:.1f} / {r['turn_small'][1]:.1f} ms",
         "≤ 50 ms p50"),
        (f"TTFT added by retrieval in a turn, {args.chunks:,}-chunk library, p50 / p99",
         f"{r['turn_big'][0]:.1f} / {r['turn_big'][1]:.1f} ms", "≤ 50 ms p50"),
    ])
    c = r["citations"]
    cites = (f"Citations with the bundled model (SmolLM2-135M-Instruct, greedy, {c['n']} questions): "
             f"{c['cited']}/{c['n']} replies cite a passage at all, {c['right']}/{c['n']} cite a passage of the right "
             f"file. For example: " + "; ".join(f"*{q}* → “{a}”" for q, a in c["examples"]) + "."
             ) if c else "Citations: not measured (--cite-sample 0)."
    return f"{quality}\n\n{cites}\n\n{speed}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000, help="synthetic chunks for the speed part")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per mode")
    parser.add_argument("--pdf-pages", type=int, default=40, help="pages of the ingestion PDF")
    parser.add_argument("--cite-sample", type=int, default=8, help="questions answered by the bundled model (0: skip)")
    parser.add_argument("--chunk-tokens", type=int, default=96, help="chunk size for the QA corpus")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        setup_django(data_dir)
        results = _measure(args)
    finally:
        _stop_services(data_dir)
    tables = _tables(results, args)
    print(tables)
    if not args.no_write:
        section = (
            f"{SECTION}\n\n`{report.command_line('bench.retrieval', argv)}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {report.machine_header(machine)}\n\n"
            f"Quality: {results['qa']} questions (bench/data/retrieval_qa.json) over four public-domain texts in "
            f"four formats (txt, md, html; bench/data), {args.chunk_tokens}-token chunks; a hit is right when it is a "
            f"chunk of the question's file holding the answer's phrase. Questions are embedded with "
            f"all-MiniLM-L6-v2 (torch, as the serving process does), chunks by the worker's numpy copy of it.\n\n"
            f"{tables}\n\nSpeed: synthetic chunks are random unit vectors and 50 words each from a 20,000-word "
            f"vocabulary (each query word matches about 125 chunks); ef_search 100. TTFT added by retrieval is "
            f"`documents.context.passages_for_turn` as a turn runs it before the request goes to the model "
            f"(question embedding on one thread, scope, hybrid search, safety screen, fitting the passages' budget "
            f"with SmolLM2's chat template).\n"
        )
        report.write_section(section, SECTION)
        print(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
