"""A backend that costs almost nothing: an OpenAI-compatible streaming server
that sends one token every --token-ms, for the relay benchmark (bench.relay).

    python -m bench.sse_stub [--port 0] [--token-ms 10]

Prints `port N` once it listens. It answers POST /v1/chat/completions with
server-sent events (HTTP/1.1, chunked, keep-alive), `max_tokens` tokens each
(every chunk pre-encoded at start, so a stream costs a timer and a write per
token), then the finish chunk, the usage chunk when `stream_options.include_usage`
asks for it, and `[DONE]`. Each reply orders the words its own way
(`reply_words`), as real replies differ. Tokens go out on a fixed schedule
(start + i × token-ms), so a stream takes the same time however busy the
reader is. Plain
asyncio and the standard library: it runs in its own process, apart from what
it is measured against.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json

# A prime count: see reply_words.
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "rivers", "run",
         "to", "sea", "and", "birds", "sing", "under", "green", "hills", "where", "old", "mills", "turn",
         "slowly", "as", "bright", "lanterns", "glow", "near", "quiet", "harbours", "full", "of", "small",
         "boats", "tonight")
MAX_TOKENS = 4096


def _chunk(payload: dict) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _piece(word: str, first: bool) -> str:
    return word if first else " " + word


def _token(word: str, first: bool) -> bytes:
    return _chunk({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                   "choices": [{"index": 0, "delta": {"content": _piece(word, first)}, "finish_reason": None}]})


# Every word's chunk, as a reply's first token and as any later one.
FIRST = [_token(word, True) for word in WORDS]
LATER = [_token(word, False) for word in WORDS]


def reply_words(n: int) -> tuple[int, int]:
    """(offset, stride) of the n-th reply's word order: word i is
    WORDS[(offset + i * stride) % len(WORDS)]. With 37 words (a prime) every
    stride from 1 to 36 visits them all, so 1,332 replies in a row differ
    (bench.relay sends about 150 a contender). The same reply every time
    would let the relay's moderation answer all but the first from its
    verdict cache, which real replies never allow."""
    return n % len(WORDS), 1 + (n // len(WORDS)) % (len(WORDS) - 1)


def word_order(n: int, count: int) -> list[int]:
    """The indices into WORDS of the n-th reply's `count` tokens."""
    offset, stride = reply_words(n)
    return [(offset + i * stride) % len(WORDS) for i in range(count)]


def reply_pieces(n: int, count: int) -> list[str]:
    """The n-th reply's text, in the pieces its token chunks carry."""
    return [_piece(WORDS[w], i == 0) for i, w in enumerate(word_order(n, count))]


HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
END = _chunk({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
              "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    return _chunk({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                   "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens}})


async def _read_request(reader: asyncio.StreamReader) -> dict | None:
    """The JSON body of the next request on this connection; None when it closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return json.loads(await reader.readexactly(length)) if length else {}


_replies = itertools.count()


async def _stream(writer: asyncio.StreamWriter, body: dict, token_s: float) -> None:
    count = max(1, min(MAX_TOKENS, int(body.get("max_tokens") or 16)))
    prompt_tokens = sum(len(str(m.get("content", ""))) // 4 + 4 for m in body.get("messages") or ())
    order = word_order(next(_replies), count)
    loop = asyncio.get_running_loop()
    writer.write(HEADERS)
    start = loop.time()
    for i in range(count):
        # A fixed schedule: a late wake-up is not carried over to the next token.
        delay = start + (i + 1) * token_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write((LATER if i else FIRST)[order[i]])
    writer.write(END)
    if (body.get("stream_options") or {}).get("include_usage"):
        writer.write(_usage(prompt_tokens, count))
    writer.write(DONE)
    await writer.drain()


def _handler(token_s: float):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (body := await _read_request(reader)) is not None:
                await _stream(writer, body, token_s)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the reader hung up (a Stop, the end of a benchmark)
        finally:
            writer.close()
    return handle


async def serve(port: int, token_s: float) -> None:
    server = await asyncio.start_server(_handler(token_s), "127.0.0.1", port)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-ms", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.token_ms / 1000))
    except KeyboardInterrupt:
        pass  # how the benchmark stops it


if __name__ == "__main__":
    main()
