"""A small OpenAI-compatible server on loopback: the remote edge of the gateway.

The requested model id picks the behaviour, so one server can play a healthy
backend and a broken one at the same time:
  fake-ok      replies "echo: <last user message>" one word per token (up to max_tokens)
  fake-slow    the same with `token_delay_s` between tokens
  fake-500     HTTP 500 before anything
  fake-429     HTTP 429 (a saturated backend)
  fake-break   one token, then the connection drops
  fake-hang    headers, then silence
  fake-stall   one token, then silence
  fake-400     HTTP 400 (the backend rejects the request itself)
  fake-nousage like fake-ok, but no usage chunk (older servers)
  fake-keepalive like fake-ok, chunked and kept alive (as uvicorn serves vLLM),
               the body's last chunk written 50 ms after [DONE]
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, token_delay_s: float = 0.05):
        self.token_delay_s = token_delay_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.active = 0
        self.connections = 0  # TCP connections accepted
        self.hangups = 0  # streams the gateway closed before their end
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, model: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if model is None or r.get("model") == model)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.connections += 1

            def handle(self):
                try:
                    super().handle()
                except OSError:
                    pass  # the gateway hung up (Stop, a timeout): expected here

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "fake-ok", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with fake.lock:
                    fake.requests.append(body)
                model = body.get("model", "")
                if model == "fake-500":
                    return self._json(500, {"error": {"message": "boom"}})
                if model == "fake-429":
                    return self._json(429, {"error": {"message": "busy"}})
                if model == "fake-400":
                    return self._json(400, {"error": {"message": "context length exceeded"}})
                words = self._reply_words(body)
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"]) + 3
                if not body.get("stream"):
                    text = " ".join(words)
                    return self._json(200, {
                        "id": "fake", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                                  "total_tokens": prompt_tokens + len(words)},
                    })
                self.chunked = model == "fake-keepalive"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if self.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                if model == "fake-hang":
                    time.sleep(30)
                    return
                finish = "stop" if len(words) < body.get("max_tokens", 10**6) else "length"
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    if not self._event({"choices": [{"index": 0, "delta": {"content": piece},
                                                     "finish_reason": None}]}):
                        return
                    if model == "fake-stall":
                        time.sleep(30)
                        return
                    if model == "fake-break":
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    if model == "fake-slow":
                        time.sleep(fake.token_delay_s)
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if model != "fake-nousage" and (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                          "completion_tokens": len(words),
                                                          "total_tokens": prompt_tokens + len(words)}})
                self._write(b"data: [DONE]\n\n")
                if self.chunked:
                    time.sleep(0.05)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()

            def _reply_words(self, body):
                # A prompt may hold no user message at all (only a system one): echo nothing then.
                last = ([m["content"] for m in body["messages"] if m["role"] == "user"] or [""])[-1]
                words = ["echo:", *last.split()]
                if body.get("model") == "fake-slow":
                    words = ["tick"] * 200
                return words[: body.get("max_tokens") or len(words)]

            def _event(self, payload) -> bool:
                """False once the gateway hung up (counted once per stream)."""
                if getattr(self, "hung_up", False):
                    return False
                try:
                    self._write(f"data: {json.dumps(payload)}\n\n".encode())
                    return True
                except OSError:
                    self.hung_up = True
                    with fake.lock:
                        fake.hangups += 1
                    return False

            def _write(self, data: bytes):
                if getattr(self, "chunked", False):
                    data = b"%x\r\n%s\r\n" % (len(data), data)
                self.wfile.write(data)
                self.wfile.flush()

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
