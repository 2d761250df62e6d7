"""The Celery worker holds no model: its titles and summaries are requests to
the serving process's API, and it cannot import the engine or torch."""
import html
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conversations.services import fallback_title
from tests.test_serve import ROOT, free_port, wait_healthy

FIRST_MESSAGE = "How do I bake sourdough bread at home with rye flour?"
# A bare `django.setup()` of this project holds ~100 MiB; one that imported
# torch ~300 MiB, one with the bundled model's engine over 1 GiB.
WORKER_MAX_RSS_MB = 250


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status_file:
        status = status_file.read()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def mapped_torch(pid: int) -> bool:
    """Whether the process ever imported torch: its shared libraries stay mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("libtorch" in line for line in maps)


def wait_for(condition, *, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def start_serve(data_dir, port: int) -> subprocess.Popen:
    env = {
        **os.environ, "DATA_DIR": str(data_dir), "LOAD_MODELS": "1", "PYTHONUNBUFFERED": "1",
        # Short replies: the title task starts when the reply is complete.
        "CHAT_REPLY_MAX_TOKENS": "8",
    }
    return subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sign_up(client: httpx.Client) -> str:
    client.get("/accounts/signup/")
    token = client.cookies["csrftoken"]
    response = client.post("/accounts/signup/", headers={"X-CSRFToken": token}, data={
        "username": "alice", "password1": "alice-pass-123", "password2": "alice-pass-123",
    })
    assert response.status_code == 302, response.text
    return client.cookies["csrftoken"]  # a new one: login rotates it


def page_title(client: httpx.Client, url: str) -> str:
    page = client.get(url).text
    return html.unescape(re.search(r"<title>(.*?) · Chat</title>", page).group(1))


def celery_processes(serve: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(serve.pid).children(recursive=True)
    return [p for p in children if "celery" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_new_chat_gets_its_title_from_the_serving_engine_and_the_worker_stays_small(tmp_path):
    port = free_port()
    proc = start_serve(tmp_path / "data", port)
    try:
        wait_healthy(port, proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            token = sign_up(client)
            response = client.post("/c/new", headers={"X-CSRFToken": token}, data={"text": FIRST_MESSAGE})
            assert response.status_code == 302, response.text
            url = response.headers["location"]

            def titled():
                title = page_title(client, url)
                return title if title != fallback_title(FIRST_MESSAGE) else None

            title = wait_for(titled, timeout_s=120, what="the chat's title", proc=proc)
        assert len(title) <= 80
        workers = celery_processes(proc)
        assert workers, "serve started no Celery worker"
        for worker in workers:
            assert not mapped_torch(worker.pid), worker.cmdline()
            assert rss_mb(worker.pid) < WORKER_MAX_RSS_MB, (worker.cmdline(), rss_mb(worker.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output


def test_a_worker_cannot_build_an_engine():
    """What the worker does at start-up (Celery's import_modules signal), in a
    fresh interpreter: the URL conf and the gateway load (they use the engine
    package's torch-free surface), and then building an engine fails, and
    says why."""
    script = (
        "import chatapp.celery as c, celery.signals as s\n"
        "s.import_modules.send(sender=c.app)\n"
        "import django; django.setup()\n"
        "import conversations.tasks, chatapp.urls, gateway.backends\n"
        "from chatapp import runtime\n"
        "for build in (lambda: __import__('torch'), lambda: runtime.engine('small')):\n"
        "    try:\n"
        "        build()\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("cannot be imported in the Celery worker" in line for line in lines), lines
