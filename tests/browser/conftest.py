"""Browser tests: Debian's Chromium driven by Playwright against Daphne.

Daphne runs in a thread of the test process (its own Twisted/asyncio loop),
so the reply tasks, the gateway and whatever it generates with (the scripted
fake gateway, or an engine registered as a pool) live in the same process
as the server, as they do under `manage.py serve`.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from chatapp import runtime

from tests.conversations.conftest import fake_gateway, serving_api_in_process  # noqa: F401  (re-exported fixtures)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def daphne_url():
    from daphne.server import Server  # installs the asyncio reactor first
    from twisted.internet import reactor

    from chatapp.asgi import application

    port = _free_port()
    server = Server(application, endpoints=[f"tcp:port={port}:interface=127.0.0.1"], signal_handlers=False,
                    verbosity=0, http_timeout=None, application_close_timeout=5)
    thread = threading.Thread(target=server.run, name="daphne", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError("daphne did not start")
    yield f"http://127.0.0.1:{port}"
    reactor.callFromThread(reactor.stop)
    thread.join(5)


@pytest.fixture(scope="session")
def browser_instance(django_db_setup):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop marked running in the main
    # thread, which trips Django's async-safety check on the test's own
    # (synchronous) database setup and flushes.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def live(daphne_url, transactional_db, settings):
    settings.STREAM_HEARTBEAT_S = 1.0
    settings.STREAM_GRACE_S = 10.0
    settings.STREAM_MATERIALIZE_S = 0.2
    yield daphne_url
    # The server's tasks keep connections on the database threads (its views'
    # on asgiref's sync thread: tests/conftest.py).
    runtime.close_db_threads()


@pytest.fixture
def page(browser_instance, live):
    context = browser_instance.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(15000)
    yield page
    context.close()


def signup(page, base: str, username: str = "carol", password: str = "a-Long-pass-4321"):
    page.goto(base + "/accounts/signup/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password1]", password)
    page.fill("input[name=password2]", password)
    page.click("form button[type=submit], form button")
    page.wait_for_url(base + "/")
