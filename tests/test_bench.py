"""The benchmarks stay runnable: their modules import, and the shared report
helper replaces only its own section of the benchmarks file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["engine", "gil", "peers", "report", "gateway", "chat", "startup", "formats", "quality", "load", "retrieval",
           "safety", "metrics", "relay", "sse_stub", "decode", "neighbour", "stages", "stage_stamps", "reply_floor",
           "reply_cascade", "prompts", "equal_paired"]


def test_every_benchmark_module_imports():
    code = "; ".join(f"import bench.{name}" for name in MODULES)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_app_package_holds_benchmark_code():
    apps = ["accounts", "chatapp", "conversations", "documents", "gateway", "inference", "observability", "retrieval",
            "safety", "memory", "sharing", "feedback", "dashboard", "evals"]
    assert [str(p) for app in apps for p in (ROOT / app).glob("bench*.py")] == []


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## A (bench.a)\n\nold a\n\n## B (bench.b)\n\nold b\n")
    report.write_section("## A (bench.a)\n\nnew a\n", "## A (bench.a)", path)
    report.write_section("## C (bench.c)\n\nnew c\n", "## C (bench.c)", path)
    assert path.read_text() == ("# Benchmarks\n\n## A (bench.a)\n\nnew a\n\n## B (bench.b)\n\nold b\n\n"
                                "## C (bench.c)\n\nnew c\n")


def test_table_and_machine_header():
    assert report.table(["x", "y"], [(1, "a")]) == "| x | y |\n|---|---|\n| 1 | a |"
    header = report.machine_header()
    assert header.startswith("Machine: ") and "torch " in header and "load average" in header


def test_a_sections_command_can_be_retyped():
    assert report.command_line("bench.engine", ["--out", "", "--json", "a b.json"]) == (
        "python -m bench.engine --out '' --json 'a b.json'")
    assert report.command_line("bench.engine", []) == "python -m bench.engine"


def test_the_fp32_peak_includes_the_engines_packed_matmuls():
    """The fp32 roofline's peak is the best of torch.mm and every packer the
    engine may run, so the engine's share is not measured against a slower kernel."""
    from bench import peers
    from inference import packing

    products = peers._square_products(64, "float32", "cpu")
    assert len(products) == 1 + len(packing.PACKERS)
    results = [product() for product in products]
    for result in results[1:]:
        assert result.shape == results[0].shape == (64, 64)
    assert len(peers._square_products(64, "bfloat16", "cpu")) == 1


def test_the_relay_benchmarks_client_reads_the_stubs_stream():
    """bench.relay's raw SSE client against bench.sse_stub: text, usage, [DONE]."""
    import asyncio

    from bench import relay

    stub, port = relay.start_stub(token_ms=1)
    try:
        target = relay.Target("stub", port, "/v1/chat/completions")
        ttft_s, tokens, end_s = asyncio.run(relay.one_stream(target, 0, 5))
    finally:
        stub.terminate()
        stub.wait(10)
    assert tokens == 5 and ttft_s is not None and end_s is not None and 0 <= end_s < 1


def test_the_relay_benchmarks_split_streams_go_to_their_servers_by_index():
    """--split: stream i goes to ports[i % N], not to the target's own port."""
    import asyncio

    from bench import free_port, relay

    dead = free_port()  # nothing listens there
    stub, port = relay.start_stub(token_ms=1)
    try:
        target = relay.Target("split", dead, "/v1/chat/completions", ports=[port])

        async def both():
            return await asyncio.gather(*(relay.one_stream(target, i, 3) for i in range(2)))

        results = asyncio.run(asyncio.wait_for(both(), 30))
        stray = relay.Target("split", port, "/v1/chat/completions", ports=[dead, port])
        with pytest.raises(OSError):  # stream 0 of [dead, live] goes to the dead one
            asyncio.run(relay.one_stream(stray, 0, 3))
    finally:
        stub.terminate()
        stub.wait(10)
    assert [tokens for _, tokens, _ in results] == [3, 3]


def test_the_stubs_replies_differ_from_one_another():
    """bench.sse_stub's replies each order the words their own way, so the
    relay's verdict cache cannot answer a burst's moderation from one reply."""
    from bench import sse_stub

    words = len(sse_stub.WORDS)
    replies = words * (words - 1)
    orders = {tuple(sse_stub.word_order(n, 32)) for n in range(replies)}
    assert len(orders) == replies >= 1000


def test_the_roofline_is_the_longer_of_compute_and_memory():
    from bench.engine import roofline

    # 1e9 parameters x 32 tokens x 2 = 64 GFLOP: 0.16 s at 400 GFLOP/s.
    compute = roofline([0.4, 0.5, 0.6], 10**9, 32, 400e9, bytes_read=10**9, read_rate=10e9)
    assert compute["bound"] == "compute"
    assert compute["roofline_pct"] == compute["compute_pct"] == 100 * 0.16 / 0.5
    # 8 GB at 10 GB/s is 0.8 s: longer than the FLOPs, so memory bounds the step.
    memory = roofline([0.4, 0.5, 0.6], 10**9, 32, 400e9, bytes_read=8 * 10**9, read_rate=10e9)
    assert memory["bound"] == "memory"
    assert memory["memory_ms"] == 800.0
    assert memory["roofline_pct"] == 100 * 0.8 / 0.5 and memory["best_roofline_pct"] == 100 * 0.8 / 0.4
    assert memory["compute_pct"] == compute["compute_pct"]
    assert roofline([], 10**9, 32, 400e9) == {"decode_steps": 0}


def test_a_decode_steps_bytes_count_the_stored_weights_and_the_kv():
    from bench.engine import step_bytes
    from inference import Engine, EngineConfig
    from tests.inference.conftest import tiny_llama

    # hidden 64, intermediate 160, 3 layers, 4 heads of 16, 2 KV heads, vocab 512.
    layer = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 160 * 64 + 64 * 160
    params = 3 * layer + 512 * 64
    kv_per_token = 3 * 2 * 2 * 16  # layers x (K, V) x KV heads x head dim
    # Packed for MKL, oneDNN or not (inference.packing), an fp32 step reads each weight once.
    from inference.packing import PACKERS

    for settings in [{"pack_backend": p} for p in PACKERS] + [{"pack_weights": False}]:
        with Engine(tiny_llama(), None, EngineConfig(kv_cache_bytes=2**20, **settings)) as engine:
            assert step_bytes(engine, 4, 10) == 4 * params + 4 * 4 * 10 * kv_per_token
    with Engine(tiny_llama(), None, EngineConfig(kv_cache_bytes=2**20, quantization="int8")) as engine:
        net = engine.runner.net
        scales = sum(s.nbytes for layer_scales in net.weight_scales for s in layer_scales)
        scales += net.lm_head_quantized[1].nbytes
        assert step_bytes(engine, 1, 0) == params + scales  # one byte a weight
    # bf16 weights: steps small_linear runs read its bf16 copies, larger ones the rounded weights in fp32.
    with Engine(tiny_llama(), None, EngineConfig(kv_cache_bytes=2**20, quantization="bf16_weight_only")) as engine:
        rows = engine.runner.net.small_rows
        if rows:
            assert step_bytes(engine, rows, 10) == 2 * params + rows * 4 * 10 * kv_per_token
        assert step_bytes(engine, rows + 1, 10) == 4 * params + (rows + 1) * 4 * 10 * kv_per_token


def test_the_packing_benchmark_times_every_contender_at_every_row_count():
    import pytest

    from bench import packing
    from inference.packing import MKL_PACKING

    if not MKL_PACKING:
        pytest.skip("this torch has no MKL sgemm packing")
    shapes = {"qkv": (32, 48, 2), "down": (40, 32, 2), "lm_head": (32, 100, 1)}
    small = packing.kernels.load_kernels()  # False without a compiler: the contender is left out
    results = packing.measure(shapes, [1, 8], [1, 3, 9], rounds=1, small_linear=small)
    contenders = ("F.linear", "packed for 1", "packed for 8") + (("oneDNN",) if packing.ONEDNN_PACKING else ())
    assert set(results) == ({(c, part, n) for c in contenders for part in ("layers", "lm_head") for n in (1, 3, 9)}
                            | {(c, part, n) for c in ("small_linear", "small_linear bf16") for part in ("layers", "lm_head")
                               for n in (1, 3) if small})
    rendered = packing.render(results, [1, 8], [1, 3, 9], "cmd", report.machine_info())
    assert ("small_linear (bf16 copies" in rendered and "small_linear (plain" in rendered) or not small
    assert all(ms > 0 for ms in results.values())
    markdown = packing.render(results, [1, 8], [1, 3], "python -m bench.packing", report.machine_info())
    assert markdown.startswith(packing.HEADING) and "| 3 | " in markdown and "MKL packed for 8" in markdown
    assert ("oneDNN packed for" in markdown) is packing.ONEDNN_PACKING
    # Shapes in whole 16-column blocks, on AVX-512: bf16 and int8 copies packed, at any row count.
    if small and packing.kernels._has_avx512():
        shapes = {"qkv": (32, 48, 2), "down": (48, 32, 2), "lm_head": (32, 64, 1)}
        results = packing.measure(shapes, [1], [1, 9], rounds=1, small_linear=True)
        assert {key for key in results if key[0].startswith("small_linear")} == (
            {("small_linear", part, 1) for part in ("layers", "lm_head")}
            | {(c, part, n) for c in ("small_linear bf16", "small_linear int8") for part in ("layers", "lm_head")
               for n in (1, 9)})
        assert "small_linear (int8 copies" in packing.render(results, [1], [1, 9], "cmd", report.machine_info())


def test_the_stages_benchmark_times_each_stage_from_its_chats_post(tmp_path):
    """Stamps keyed by reply id, or by the engine's request id, land on the
    chat whose POST was sent at `sent`; a stage never stamped stays empty."""
    import json

    from bench.stages import STAGES, stage_times

    stamps = tmp_path / "stamps.jsonl"
    stamps.write_text("\n".join(json.dumps(line) for line in [
        [100.010, "django", "r1"], [100.030, "saved", "r1"], [100.040, "request:q1", "r1"],
        [100.045, "engine", "q1"], [100.150, "first token", "q1"], [200.020, "django", "r2"],
    ]) + "\n")
    turns = [{"reply": "r1", "sent": 100.0, "POST answered": 100.050, "token read": 100.160},
             {"reply": "r2", "sent": 200.0, "POST answered": 200.040, "token read": None}]
    times = stage_times(turns, stamps)
    assert list(times) == STAGES
    assert [round(t) for t in times["django"]] == [10, 20]
    assert [round(t) for t in times["engine"]] == [45] and [round(t) for t in times["first token"]] == [150]
    assert [round(t) for t in times["token read"]] == [160] and times["gateway"] == []


def test_a_replys_harm_risk_is_its_riskiest_windows_harm_categories(monkeypatch):
    """bench.reply_cascade scores a reply as the checker windows it, on the
    harm categories alone (never benign, injection or jailbreak)."""
    import numpy as np

    from bench import reply_cascade
    from safety import checkers

    class Head:
        labels = ["benign", "harassment", "violence", "prompt_injection", "jailbreak"]

        def probabilities(self, texts):
            rows = {"calm": [0.9, 0.05, 0.05, 0.0, 0.0], "rough": [0.2, 0.3, 0.2, 0.3, 0.0],
                    "pasted": [0.0, 0.0, 0.0, 0.6, 0.4]}
            return np.asarray([rows[t] for t in texts])

    monkeypatch.setattr(checkers, "windows", lambda text: text.split())
    risk = reply_cascade.harm_risk(Head(), ["calm rough", "pasted", "calm"])
    np.testing.assert_allclose(risk, [0.5, 0.0, 0.1])


def test_the_bf16_prompts_peer_runs_prefill_in_bf16_and_decode_on_rounded_weights(tmp_path):
    """HF in the engine's format with bf16 prompts (bench.peers.BF16_PROMPTS):
    a forward over several positions multiplies in bf16, one position in fp32
    over the rounded weight; the lm_head keeps fp32 activations."""
    import torch

    from bench import peers
    from tests.inference.conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path)
    model = peers.load_model(str(tmp_path), "float32", peers.BF16_PROMPTS, "cpu")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, peers.PromptsInBf16Linear) and layer.half.dtype == torch.bfloat16
    assert not isinstance(model.lm_head, peers.PromptsInBf16Linear)
    x = torch.randn(1, 5, layer.half.shape[1])
    assert torch.equal(layer(x), torch.nn.functional.linear(x.bfloat16(), layer.half).float())
    one = x[:, :1]
    assert torch.equal(layer(one), torch.nn.functional.linear(one, layer.half.float()))
    assert peers.peer_quantization("bf16_weight_only", True) == peers.BF16_PROMPTS
    assert peers.peer_quantization("bf16_weight_only", False) == "bf16_weight_only"
    with torch.no_grad():  # and it generates
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_the_int8_prompts_peer_runs_prefill_in_bf16_and_decode_on_the_int8_weights(tmp_path):
    """HF in the engine's format with int8 weights and bf16 prompts
    (bench.peers.INT8_PROMPTS): prefill over the dequantized weights rounded
    to bf16, decode in fp32 over the dequantized weights themselves, the
    lm_head too (small_linear multiplies them so)."""
    import torch

    from bench import peers
    from inference.formats import int8_weight
    from tests.inference.conftest import tiny_llama

    original = tiny_llama()
    original.save_pretrained(tmp_path)
    model = peers.load_model(str(tmp_path), "float32", peers.INT8_PROMPTS, "cpu")
    layer = model.model.layers[0].mlp.down_proj
    dequantized = int8_weight(original.model.layers[0].mlp.down_proj.weight.detach())
    assert isinstance(layer, peers.PromptsInBf16Linear) and torch.equal(layer.rounded, dequantized)
    assert torch.equal(layer.half, dequantized.bfloat16())
    assert torch.equal(model.lm_head.weight_dequantized, int8_weight(original.lm_head.weight.detach()))
    one = torch.randn(1, 1, layer.half.shape[1])
    assert torch.equal(layer(one), torch.nn.functional.linear(one, dequantized))
    assert peers.peer_quantization("int8_weight_only", True) == peers.INT8_PROMPTS
    assert peers.peer_quantization("int8_weight_only", False) == "int8_weight_only"
    with torch.no_grad():
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_the_chat_benchmarks_client_reads_a_reply_stream():
    """bench.chat's plain-socket reader over the product's own SSE frames
    (conversations.streams), sent chunked and cut mid-frame, with a heartbeat
    between them: the first token's time and the done event's usage."""
    import asyncio
    from types import SimpleNamespace

    from bench import chat
    from conversations.streams import StreamEvent, terminal_event

    usage = SimpleNamespace(prompt_tokens=5, completion_tokens=2, cached_tokens=0)
    body = b"".join([StreamEvent(1, "token", {"text": "Hi"}).encode(), b": heartbeat\n\n",
                     StreamEvent(2, "token", {"text": " there"}).encode(),
                     terminal_event(3, "complete", "Hi there", usage=usage).encode()])
    seen = {}

    async def serve(reader, writer):
        seen["request"] = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (body[:7], body[7:40], body[40:]):  # chunks that end inside frames
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await chat.read_reply(f"http://127.0.0.1:{port}", "abc", "/c/reply/7/stream", 0.0)

    first, tokens = asyncio.run(asyncio.wait_for(run(), 30))
    assert tokens == 2 and first is not None and first > 0
    assert seen["request"].startswith(b"GET /c/reply/7/stream HTTP/1.1") and b"Cookie: sessionid=abc" in seen["request"]


def test_the_chat_benchmark_sends_every_run_new_prompts(monkeypatch):
    """bench.chat never sends the server a text it has sent before (a
    repeated prompt's greedy reply is the same, and moderation would read it
    from its caches, which no real reply allows), and within each round the
    engine alone and the web path get the same prompts, in swapped order."""
    import asyncio
    from types import SimpleNamespace

    from bench import chat

    sent = []

    def contender(kind, position):  # engine_run(engine, texts, ...), web_run(base, cookies, texts, ...)
        async def run(*args):
            texts = args[position]
            sent.append((kind, tuple(texts)))
            return {"tokens": len(texts), "wall_s": 1.0, "tok_s": float(len(texts)), "ttft_p50_ms": 1.0,
                    "ttft_p99_ms": 1.0, "n": len(texts), "post_p50_ms": None}
        return run

    monkeypatch.setattr(chat, "engine_run", contender("engine", 1))
    monkeypatch.setattr(chat, "web_run", contender("web", 2))
    args = SimpleNamespace(clients=4, singles=2, rounds=3, max_tokens=8, stagger_ms=250)
    asyncio.run(chat.run(args, "http://127.0.0.1:1", ["c"] * 4, "idle", [], engine=None))

    # Singles' warm-up and measured chats (two each), the burst's warm-up, three rounds, three staggered rounds.
    pairs = list(zip(sent[0::2], sent[1::2]))
    assert len(pairs) == 4 + 1 + 3 + 3
    assert all(a[1] == b[1] for a, b in pairs)
    assert [a[0] for a, _ in pairs[5:8]] == ["engine", "web", "engine"]
    web_texts = [text for kind, texts in sent if kind == "web" for text in texts]
    assert len(web_texts) == len(set(web_texts)) == 2 + 2 + 4 + 3 * 4 + 3 * 4


@pytest.mark.parametrize("flag", ["--singles", "--rounds", "--clients", "--max-tokens"])
def test_the_chat_benchmark_refuses_counts_below_one(flag, capsys):
    """Its tables divide by the single chats' wall time and the rounds' runs:
    zero of them is refused with the option's name, not a ZeroDivisionError
    after the server started."""
    from bench import chat

    with pytest.raises(SystemExit) as exit_:
        chat._parse_args([flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err
    assert chat._parse_args([flag, "1"])


@pytest.mark.django_db(transaction=True)
def test_the_stage_stamps_follow_a_new_chat_through_the_deployed_handler(alice, chat_engine, tmp_path):
    """bench.stages' probes see a chat sent to the product's own ASGI
    application: every stage from Django's handler to the reply's log is
    stamped for it. (A wrapper on a method the handler no longer calls
    stamps nothing: 65a97d5 left seven stages empty that way.)"""
    import asyncio
    import json
    from urllib.parse import urlencode

    from django.test import Client

    from bench import stage_stamps
    from bench.stages import STAGES, stage_times
    from chatapp.asgi import application
    from conversations import turns
    from conversations.models import Message
    from tests.asgi_calls import call

    client = Client()
    client.force_login(alice)
    csrf = "a" * 32  # an unmasked CSRF secret: the cookie and the header agree
    headers = [(b"cookie", f"sessionid={client.cookies['sessionid'].value}; csrftoken={csrf}".encode()),
               (b"x-csrftoken", csrf.encode()), (b"hx-request", b"true"),
               (b"content-type", b"application/x-www-form-urlencoded")]

    async def post():
        status, _ = await call(application, "POST", "/c/new", headers=headers,
                               body=urlencode({"text": "Stamp me"}).encode())
        await turns.wait_idle(20)
        return status

    stamps_file = tmp_path / "stamps.jsonl"
    stage_stamps._patch(str(stamps_file))
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(post()) == 200
    finally:
        stage_stamps.uninstall()
        pending = asyncio.all_tasks(loop)  # the reply keeper, the stream fan-out
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    reply = Message.objects.get(conversation__user=alice, role="assistant")
    assert reply.status == "complete"
    times = stage_times([{"reply": str(reply.id), "sent": 0.0, "POST answered": None, "token read": None}],
                        stamps_file)
    server_side = STAGES[:STAGES.index("in the log") + 1]
    assert [stage for stage in server_side if not times[stage]] == []
    assert not stage_stamps._replaced
