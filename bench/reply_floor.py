"""The least time moderating replies adds to a burst through the relay, on
this machine (issue 16, item 3).

    python -m bench.reply_floor [--streams 32] [--tokens 128] [--token-ms 10] [--rounds 5] [--write]

bench.relay sends --streams requests at once through /v1 to bench.sse_stub,
which streams --tokens tokens a reply, one every --token-ms. The replies all
end together, and the classifiers' final read of each (OutputWindow.aflush)
can only start after its last token: the burst's wall time is at least the
stream's plus those final reads, whatever the relay's own cost.

This bench computes that floor without a server, a network or another
process. It replays the stub's replies (its words, in its pieces) through the
reading plan OutputWindow follows (safety.services.reply_read_start), and
times what the classifier reads (the embedding head checker's `check` on the
replies' reads, as the product runs it: the embedding thread at
EMBEDDING_THREADS torch threads, the format "auto" picks, retrieval's vector
cache emptied before each timing):

- the burst's mid-stream reads as one check, and its final reads as one
  check, best of --rounds, the plans alternating;
- the floor of the burst's wall time: the stream ((tokens - 1) × token-ms)
  plus the final reads; and so the largest share of the stub's tok/s the
  relay can reach with this classifier here (bench.relay measures the share);
- the reading plan of today's settings beside alternatives (a shorter
  overlap, reading more or less often), which trade the classifier's CPU
  against how much of a reply streams before it was read (docs/SAFETY.md).

The rules are left out: they gate every token on the event loop (about 4 µs
a token, bench.relay's "rules only" rows), not at the reply's end.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench import report, setup_django_offline
from bench.sse_stub import reply_pieces

SECTION = "## The least time moderating replies adds to a burst (bench.reply_floor)"


@dataclass(frozen=True)
class Plan:
    label: str
    every: int | None  # characters between mid-stream reads (None: SAFETY_OUTPUT_CHECK_CHARS)
    overlap: int | None  # characters reread before the unread text (None: the product's)


def reads(pieces: list[str], plan: Plan) -> tuple[list[str], list[str]]:
    """(mid-stream reads, final reads) of one reply streamed in `pieces`."""
    from safety.services import OUTPUT_OVERLAP_CHARS, reply_read_start

    overlap = OUTPUT_OVERLAP_CHARS if plan.overlap is None else plan.overlap
    text, classified, mid = "", 0, []
    for piece in pieces:
        text += piece
        start = reply_read_start(len(text), classified, final=False, every=plan.every, overlap=overlap)
        if start is not None:
            mid.append(text[start:])
            classified = len(text)
    start = reply_read_start(len(text), classified, final=True, every=plan.every, overlap=overlap)
    return mid, ([text[start:]] if start is not None else [])


def _timed_check(checker, texts: list[str]) -> float:
    """Seconds one check of `texts` as replies takes, nothing remembered."""
    from retrieval import services as retrieval_services

    if not texts:
        return 0.0
    retrieval_services.forget()
    start = time.perf_counter()
    checker.check(texts, "output")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32, help="replies ending together")
    parser.add_argument("--tokens", type=int, default=128, help="tokens a reply")
    parser.add_argument("--token-ms", type=float, default=10.0, help="the stub's time between tokens")
    parser.add_argument("--rounds", type=int, default=5, help="timings of each check (best kept)")
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    setup_django_offline()
    from django.conf import settings
    from transformers import AutoTokenizer

    from retrieval import services as retrieval_services
    from safety.checkers import EmbeddingHeadChecker
    from safety.services import OUTPUT_OVERLAP_CHARS

    every = settings.SAFETY_OUTPUT_CHECK_CHARS
    plans = [
        Plan(f"today: every {every}, overlap {OUTPUT_OVERLAP_CHARS}", None, None),
        Plan(f"every {every}, overlap {OUTPUT_OVERLAP_CHARS // 2}", None, OUTPUT_OVERLAP_CHARS // 2),
        Plan(f"every {every // 2}, overlap {OUTPUT_OVERLAP_CHARS}", every // 2, None),
        Plan(f"every {2 * every}, overlap {OUTPUT_OVERLAP_CHARS}", 2 * every, None),
        Plan("at the end only", 10**9, None),
    ]
    replies = [reply_pieces(n, args.tokens) for n in range(args.streams)]
    # Each plan's mid-stream reads of the whole burst, and its final reads.
    burst = {}
    for plan in plans:
        per_reply = [reads(pieces, plan) for pieces in replies]
        burst[plan] = ([t for mid, _ in per_reply for t in mid], [t for _, final in per_reply for t in final])
    checker = EmbeddingHeadChecker()
    checker.warm()
    embedding = retrieval_services.load()
    tokenizer = AutoTokenizer.from_pretrained(retrieval_services.model_path())
    best = {plan: [float("inf"), float("inf")] for plan in plans}
    for _ in range(args.rounds):
        for plan in plans:
            mid, final = burst[plan]
            best[plan][0] = min(best[plan][0], _timed_check(checker, mid))
            best[plan][1] = min(best[plan][1], _timed_check(checker, final))
    stream_s = (args.tokens - 1) * args.token_ms / 1e3
    chars = sum(len("".join(pieces)) for pieces in replies) / len(replies)
    rows = []
    for plan in plans:
        mid, final = burst[plan]
        read_chars = sum(map(len, mid + final)) / len(replies)
        final_tokens = sum(len(tokenizer(t, truncation=True, max_length=512)["input_ids"]) for t in final)
        mid_s, final_s = best[plan]
        rows.append((plan.label, f"{len(mid) / len(replies):.1f}", f"{read_chars:.0f}",
                     f"{final_tokens / max(1, len(final)):.0f}", f"{1e3 * mid_s:.0f}", f"{1e3 * final_s:.0f}",
                     f"{1e3 * (mid_s + final_s) / len(replies):.1f}", f"{stream_s + final_s:.2f}",
                     f"{100 * stream_s / (stream_s + final_s):.1f}%"))
    table = report.table(
        ["reading plan", "mid-stream reads a reply", "characters read a reply", "MiniLM tokens a final read",
         f"{args.streams} mid-stream reads, ms", f"{args.streams} final reads, ms", "classifier ms a reply",
         "burst floor, s", "highest share of the stub's tok/s"], rows)
    text = "\n\n".join([
        f"Command: `{report.command_line('bench.reply_floor', argv)}`. {report.machine_header(machine)} "
        f"The embedding head on {embedding['dtype'] if embedding else '?'} MiniLM, "
        f"{settings.EMBEDDING_THREADS} torch thread(s) as on the embedding thread.",
        f"{args.streams} replies of bench.sse_stub ({args.tokens} tokens, {chars:.0f} characters on average), "
        f"ending together after a {stream_s:.2f} s stream; each read timed as one check of the burst, "
        f"best of {args.rounds}:",
        table,
        "The floor is the stream plus the final reads, which start after the last token; the mid-stream reads "
        "also take CPU from the relay while the replies stream, so bench.relay's share stays below it. The "
        "other plans let more of a reply stream before the classifier has read it (docs/SAFETY.md).",
    ])
    print(text)
    if args.write:
        report.write_section(f"{SECTION}\n\n{text}\n", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
