"""A second running instance of the project as a remote backend of the first.

The node is a real `manage.py serve` on its own DATA_DIR (its own Postgres,
Redis and SmolLM2 engine), reached over HTTP through its OpenAI-compatible API
with an API key created on it. This process plays the first instance: the chat
path (`stream_chat`) routes to the node like to any remote backend.
"""
import os
import subprocess
import sys
import time

import httpx
import pytest
from asgiref.sync import sync_to_async

from gateway.models import UsageRecord
from gateway.types import ChatRequest
from tests.gateway.helpers import add_remote, collect
from tests.gateway.live import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def node(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DATA_DIR=str(tmp_path / "node"), LOAD_MODELS="1", PYTHONUNBUFFERED="1",
               DJANGO_SUPERUSER_USERNAME="node", DJANGO_SUPERUSER_PASSWORD="node-pass-123",
               DJANGO_SUPERUSER_EMAIL="node@example.com", ENGINE_KV_CACHE_MB="64")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--no-worker"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the node never became healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "createsuperuser", "--noinput"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        key = subprocess.run([*manage, "create_api_key", "node"], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        yield f"http://127.0.0.1:{port}/v1", key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_a_chat_is_served_by_another_instance_over_its_api(transactional_db, node, alice):
    base_url, key = node
    backend = await sync_to_async(add_remote)(type("Node", (), {"base_url": base_url})(), "node",
                                              remote_model="small", api_key=key)
    request = ChatRequest(messages=[{"role": "user", "content": "Say hello."}], user_id=alice.pk, model="node",
                          max_tokens=12, temperature=0)
    text, final = await collect(request)
    assert text.strip() and final.model == backend.name
    assert final.finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > 0 and 0 < final.usage.completion_tokens <= 12
    row = await UsageRecord.objects.aget(request_id=request.request_id)
    assert row.backend == "node" and row.charged_tokens == final.usage.total_tokens
