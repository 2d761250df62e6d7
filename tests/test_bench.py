"""The benchmarks stay runnable: their modules import, and the shared report
helper replaces only its own section of the benchmarks file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["engine", "gil", "peers", "report", "gateway", "chat", "startup", "formats", "quality", "load", "retrieval",
           "safety", "metrics", "relay", "sse_stub", "decode", "neighbour"]


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


def test_the_relay_benchmarks_client_reads_the_stubs_stream():
    """bench.relay's raw SSE client against bench.sse_stub: text, usage, [DONE]."""
    import asyncio

    from bench import relay

    stub, port = relay.start_stub(token_ms=1)
    try:
        target = relay.Target("stub", port, "/v1/chat/completions")
        ttft_s, tokens = asyncio.run(relay.one_stream(target, 0, 5))
    finally:
        stub.terminate()
        stub.wait(10)
    assert tokens == 5 and ttft_s is not None
