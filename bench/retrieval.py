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
   built once after the load (--data-dir keeps it for later runs); p50/p99
   of each search mode, today's and the 02:26 code (bench/retrieval_before.py)
   alternately on the same queries.
4. TTFT added by retrieval: `documents.context.passages_for_turn` as a turn
   runs it (embed the question, scope, hybrid search, safety screen, fit the
   budget with the model's tokenizer), on the QA library and on the large one,
   with the chunks' stored safety verdicts and with every passage screened at
   the turn (as before verdicts were stored) alternately, each cold.
"""
from __future__ import annotations

import argparse
import json
import os
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
PARTS = ("quality", "ingestion", "speed", "turn")


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
    """One user's library of `n` chunks; the HNSW index rebuilt after the load.
    A library of `n` already there (a kept --data-dir) is used as it is."""
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.db import connection

    from documents.models import Document

    rng = np.random.default_rng(0)
    vocabulary = [f"lex{i:05d}" for i in range(20000)]
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    user = get_user_model().objects.filter(username="big").first()
    if user is not None and Document.objects.filter(user=user, chunks_total=n).exists():
        return user, vectors, vocabulary, None
    if user is not None:
        user.delete()
    user = get_user_model().objects.create_user("big")
    document = Document.objects.create(user=user, name="synthetic", kind="txt", storage_key="", size_bytes=0,
                                       status="ready", chunks_total=n, chunks_done=n)
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


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return (time.perf_counter() - started) * 1000, out


def _speed(user, vectors, vocabulary, queries: int) -> dict:
    """Each mode, today's search and the 02:26 one (bench.retrieval_before)
    on the same queries, in alternating order; and how often their top 5 agree."""
    import numpy as np

    from bench import retrieval_before
    from documents import selectors

    rng = np.random.default_rng(1)
    scope = selectors.sized(selectors.Scope(user_id=user.id, conversation_id=None, use_library=True))
    out = {}
    for mode in MODES:
        times = {"before": [], "after": []}
        agree = []
        for i in range(queries + 10):
            target = vectors[rng.integers(0, len(vectors))] + 0.05 * rng.standard_normal(384).astype(np.float32)
            vector = (target / np.linalg.norm(target)).tolist()
            query = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), 5))
            runs = {"before": lambda: retrieval_before.search(scope=scope, query=query, vector=vector, mode=mode),
                    "after": lambda: selectors.search(scope=scope, query=query, vector=vector, mode=mode)}
            hits = {}
            for name in (("before", "after") if i % 2 else ("after", "before")):
                ms, found = _timed(runs[name])
                hits[name] = [h.chunk_id for h in found]
                if i >= 10:  # warm-up
                    times[name].append(ms)
            agree.append(len(set(hits["before"]) & set(hits["after"])) / max(1, len(hits["before"])))
        out[mode] = {name: (percentile(t, 0.5), percentile(t, 0.99)) for name, t in times.items()}
        out[mode]["agree"] = sum(agree) / len(agree)
    return out


# ------------------------------------------------------------ 4. TTFT added by retrieval

def _screened_at_the_turn(**kwargs):
    """`passages_for_turn` as it ran before verdicts were stored: every
    passage through the screen (its per-process LRU aside), nothing written back."""
    from unittest import mock

    from documents import context

    def screen_all(hits, *, user_id):
        return context.screen([h.text for h in hits], user_id=user_id)

    with mock.patch.object(context, "screen_hits", screen_all):
        return context.passages_for_turn(**kwargs)


def _store_verdicts(user, conversation, questions: list[str]) -> int:
    """The verdicts of every chunk these questions retrieve, judged and stored
    as ingestion stores them (the synthetic library is loaded by COPY, not
    ingested). Returns how many chunks were judged."""
    from django.conf import settings

    from documents import selectors, services
    from retrieval import services as retrieval_services
    from safety import services as safety_services

    scope = selectors.turn_scope(user_id=user.id, conversation_id=conversation.id)
    version, judged = safety_services.policy_version(), 0
    for question in questions:
        hits = [h for h in selectors.search(scope=scope, query=question, vector=retrieval_services.embed([question])[0],
                                            top_k=settings.DOCUMENTS_TOP_K) if h.verdict_version != version]
        verdicts = safety_services.judge_passages([h.text for h in hits])
        services.chunk_verdicts_store(verdicts=[(h.chunk_id, v) for h, v in zip(hits, verdicts)])
        judged += len(hits)
    return judged


def _turn_overhead(user, conversation, questions: list[str], rounds: int, *, verdicts_kept: bool) -> dict:
    """`passages_for_turn` with stored verdicts ("after") and screening every
    passage at the turn ("before"), alternating, with no question vector
    kept; and no verdict remembered by the safety pipeline either, unless
    `verdicts_kept` (the turn's passages were screened before in this
    process: a chat asking about the same document again). Wall and CPU
    (process_time) milliseconds."""
    from django.conf import settings
    from transformers import AutoTokenizer

    from documents import context
    from inference.bootstrap import resolve_model
    from retrieval import services as retrieval_services
    from safety import pipeline

    count = _counter(AutoTokenizer.from_pretrained(resolve_model("bundled:smollm2", settings.MODELS_DIR)))
    kwargs = {"user_id": user.id, "conversation_id": conversation.id, "prompt_budget_tokens": 8192 - 512,
              "count_tokens": count}
    runs = {"before": _screened_at_the_turn, "after": context.passages_for_turn}
    times = {"before": [], "after": []}
    cpu = {"before": [], "after": []}
    for i in range(rounds + 5):
        question = questions[i % len(questions)]
        for name in (("before", "after") if i % 2 else ("after", "before")):
            pipeline.forget()
            if verdicts_kept:
                runs[name](query=question, **kwargs)
            retrieval_services.forget()
            started = time.process_time()
            ms, _ = _timed(lambda: runs[name](query=question, **kwargs))
            if i >= 5:
                times[name].append(ms)
                cpu[name].append((time.process_time() - started) * 1000)
    return {name: (percentile(t, 0.5), percentile(t, 0.99), percentile(cpu[name], 0.5)) for name, t in times.items()}


# ------------------------------------------------------------ the report

def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _stop_postgres_and_redis() -> None:
    """A kept --data-dir: its services stop, its files stay."""
    from chatapp import embedded

    embedded.stop_configured()



def _measure(args) -> dict:
    from django.contrib.auth import get_user_model

    from conversations import services as chat_services
    from documents import services

    qas = json.loads((DATA / "retrieval_qa.json").read_text())
    get_user_model().objects.filter(username="reader").delete()  # a kept --data-dir's last run
    reader = get_user_model().objects.create_user("reader")
    _load_corpus(reader, args.chunk_tokens)
    chat = chat_services.conversation_create(user=reader)
    services.chat_use_library(conversation_id=chat.id, on=True)
    results = {"qa": len(qas)}
    if "quality" in args.parts:
        results["quality"] = _quality(reader, qas)
        results["citations"] = _citations(reader, chat, random.Random(0).sample(qas, len(qas)), args.cite_sample) \
            if args.cite_sample else None
    if "turn" in args.parts:
        results["judged_small"] = _store_verdicts(reader, chat, [q["q"] for q in qas])  # 0: ingestion judged them
        for kept in (False, True):
            results[("turn_small", kept)] = _turn_overhead(reader, chat, [q["q"] for q in qas], args.queries // 2,
                                                           verdicts_kept=kept)
    if "ingestion" in args.parts:
        results["ingestion"] = _ingestion(reader, args.pdf_pages)
    if "speed" in args.parts or "turn" in args.parts:
        big, vectors, vocabulary, results["build_s"] = _synthetic_library(args.chunks)
    if "speed" in args.parts:
        results["speed"] = _speed(big, vectors, vocabulary, args.queries)
    if "turn" in args.parts:
        big_chat = chat_services.conversation_create(user=big)
        services.chat_use_library(conversation_id=big_chat.id, on=True)
        results["judged_big"] = _store_verdicts(big, big_chat, [q["q"] for q in qas])
        for kept in (False, True):
            results[("turn_big", kept)] = _turn_overhead(big, big_chat, [q["q"] for q in qas], args.queries // 2,
                                                         verdicts_kept=kept)
    return results


def _pair(r: dict) -> tuple[str, str, str]:
    (b50, b99), (a50, a99) = r["before"], r["after"]
    return f"{b50:.1f} / {b99:.1f} ms", f"{a50:.1f} / {a99:.1f} ms", f"{a50 / b50:.2f}"


def _speed_rows(r: dict, args) -> list[tuple]:
    rows = []
    if "ingestion" in r:
        ing = r["ingestion"]
        rows.append((f"ingestion, a {ing['pages']}-page PDF ({ing['mb']:.1f} MB, {ing['chunks']} chunks of 200 "
                     f"tokens), {ing['threads']} embedding thread", "—",
                     f"{ing['pages_per_s']:.1f} pages/s ({ing['seconds']:.1f} s; extract {ing['extract_s']:.2f} s, "
                     f"chunk {ing['chunk_s']:.2f} s, the rest embedding, screening and storing)", "—", "—"))
    for mode in MODES if "speed" in r else ():
        rows.append((f"{mode} search, {args.chunks:,} chunks in scope, p50 / p99 (same top 5 as before: "
                     f"{r['speed'][mode]['agree']:.0%})", *_pair(r["speed"][mode]),
                     "≤ 30 ms p50" if mode == "hybrid" else "—"))
    if "build_s" in r:
        rows.append((f"HNSW build after loading {args.chunks:,} chunks", "—",
                     f"{r['build_s']:.0f} s" if r["build_s"] is not None else "(kept library, not rebuilt)", "—", "—"))
    return rows


def _turn_rows(r: dict, args) -> list[tuple]:
    rows = []
    for key, what in (("turn_small", "QA library"), ("turn_big", f"{args.chunks:,}-chunk library")):
        for kept, how in ((False, "passages new to this process's screen"),
                          (True, "passages screened before in this process")):
            if (key, kept) in r:
                (b50, b99, bcpu), (a50, a99, acpu) = r[(key, kept)]["before"], r[(key, kept)]["after"]
                rows.append((f"TTFT added by retrieval in a turn, {what}, {how}, p50 / p99 (CPU p50)",
                             f"{b50:.1f} / {b99:.1f} ms ({bcpu:.1f} ms)", f"{a50:.1f} / {a99:.1f} ms ({acpu:.1f} ms)",
                             f"{a50 / b50:.2f}", "≤ 50 ms p50"))
    return rows


def _tables(r: dict, args) -> str:
    parts = []
    if "quality" in r:
        q = r["quality"]
        parts.append(report.table(["search", "recall@5", "MRR"], [
            (mode, f"{q[mode]['recall@5']:.2f}", f"{q[mode]['mrr']:.2f}") for mode in MODES]))
        c = r["citations"]
        parts.append((f"Citations with the bundled model (SmolLM2-135M-Instruct, greedy, {c['n']} questions): "
                      f"{c['cited']}/{c['n']} replies cite a passage at all, {c['right']}/{c['n']} cite a passage of "
                      f"the right file. For example: " + "; ".join(f"*{q}* → “{a}”" for q, a in c["examples"]) + "."
                      ) if c else "Citations: not measured (--cite-sample 0).")
    parts.append(report.table(["what", "before (02:26 code)", "after", "after / before", "goal"],
                              _speed_rows(r, args)))
    if _turn_rows(r, args):
        parts.append(report.table(["what", "every passage screened at the turn", "stored verdicts", "after / before",
                                   "goal"], _turn_rows(r, args)))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000, help="synthetic chunks for the speed part")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per mode")
    parser.add_argument("--pdf-pages", type=int, default=40, help="pages of the ingestion PDF")
    parser.add_argument("--cite-sample", type=int, default=8, help="questions answered by the bundled model (0: skip)")
    parser.add_argument("--chunk-tokens", type=int, default=96, help="chunk size for the QA corpus")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to measure, comma-separated: {', '.join(PARTS)} (the section is written only "
                             f"with all of them)")
    parser.add_argument("--data-dir", type=Path, help="keep Postgres here: the synthetic library is loaded and "
                        "indexed once, and later runs with the same --chunks reuse it (minutes saved)")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(args.parts - set(PARTS)))}")
    machine = report.machine_info()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    load = _load()
    try:
        setup_django(data_dir)
        results = _measure(args)
    finally:
        if args.data_dir:
            _stop_postgres_and_redis()
        else:
            _stop_services(data_dir)
    tables = _tables(results, args)
    print(tables)
    print(f"load average at the start {load}, at the end {_load()}")
    if not args.no_write and args.parts == set(PARTS):
        r_judged = (f"{results['judged_big']} chunks; in the QA library ingestion had judged them all, "
                    f"{results['judged_small']} left")
        section = (
            f"{SECTION}\n\n{report.provenance('bench.retrieval', argv, machine)}\n\n"
            f"Quality: {results['qa']} questions (bench/data/retrieval_qa.json) over four public-domain texts in "
            f"four formats (txt, md, html; bench/data), {args.chunk_tokens}-token chunks; a hit is right when it is a "
            f"chunk of the question's file holding the answer's phrase. Questions are embedded with "
            f"all-MiniLM-L6-v2 (torch, as the serving process does), chunks by the worker's numpy copy of it.\n\n"
            f"{tables}\n\nLoad average {load} at the start, {_load()} at the end. Ingestion judges each "
            f"batch of chunks with the safety screen as well as embedding it (the head reads each chunk's windows "
            f"through the same numpy MiniLM), so its verdicts are stored for the turns. Speed: synthetic "
            f"chunks are random unit vectors and 50 words each from a 20,000-word vocabulary (each query word "
            f"matches about 125 chunks). *Before* is the code measured at 02:26 (bench/retrieval_before.py), "
            f"*after* today's, run alternately on the same queries in this one run, so the ratio holds while the "
            f"box's load moves both. TTFT added by retrieval is `documents.context.passages_for_turn` as a turn "
            f"runs it before the request goes to the model (scope, question embedding, hybrid search, safety "
            f"screen, fitting the passages' budget with SmolLM2's chat template), with the question's vector never "
            f"computed before. *Every passage screened at the turn* is that code as it was before chunks stored "
            f"their safety verdicts; *stored verdicts* is today's, where a chunk's verdict judged at ingestion under "
            f"the current policy version skips the screen (the synthetic chunks, loaded by COPY, had the verdicts "
            f"of the chunks the questions retrieve judged and stored first: {r_judged}); the two alternate on the "
            f"same questions. *Passages screened before in this process*: the safety pipeline also remembers their "
            f"verdicts (its per-process LRU), as when a chat asks about the same document again. *Same top 5 as before*: random "
            f"vectors are all about equally far from a query past its nearest one, so two HNSW walks (ef_search "
            f"100 before, 40 now) pick different ones of those near-ties, and full text now ranks by ts_rank, "
            f"not ts_rank_cd; the QA set above measures quality.\n"
        )
        report.write_section(section, SECTION)
        print(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
