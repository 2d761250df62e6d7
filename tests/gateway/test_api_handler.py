"""/v1 through the product's ASGI application, which gives it a handler of
its own (settings.API_MIDDLEWARE): what the API keeps of the site's
middleware, and what it leaves to the pages."""
import pytest

from chatapp.asgi import ApiHandler, application
from gateway.keys import api_key_create
from tests.asgi_calls import exchange
from tests.hops import thread_hops


@pytest.fixture
def alice_key(alice):
    return api_key_create(user=alice, name="test")[1]


async def call(method: str, path: str, headers=(), scheme="http", app=application, request_body=b""):
    start, body = await exchange(app, method, path, headers=headers, body=request_body, scheme=scheme, timeout_s=10)
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body


async def get(path: str, headers=(), scheme="http", app=application):
    return await call("GET", path, headers, scheme, app)


async def test_the_api_keeps_request_ids_and_security_headers_but_not_the_pages_middleware(remote, alice_key):
    status, headers, _ = await get("/v1/models", [(b"authorization", f"Bearer {alice_key}".encode())])
    assert status == 200
    assert headers["x-request-id"] and headers["x-content-type-options"] == "nosniff"
    assert "referrer-policy" in headers
    # The pages' own: a CSP for HTML, sessions and CSRF cookies, frame options.
    assert "content-security-policy" not in headers and "set-cookie" not in headers
    assert "x-frame-options" not in headers
    status, headers, _ = await get("/accounts/login/")
    assert status == 200 and "content-security-policy" in headers and "x-frame-options" in headers


async def test_the_api_still_redirects_to_https_when_the_site_does(remote, alice_key, settings):
    settings.SECURE_SSL_REDIRECT = True  # read when a handler is built, as Django's middleware does
    status, headers, _ = await get("/v1/models", [(b"authorization", f"Bearer {alice_key}".encode())],
                                   app=ApiHandler())
    assert status == 301 and headers["location"] == "https://testserver/v1/models"


async def test_an_unknown_api_route_is_a_json_404_through_the_api_handler(remote, alice_key):
    status, headers, body = await get("/v1/audio/speech", [(b"authorization", f"Bearer {alice_key}".encode())])
    assert status == 404 and b'"not_found"' in body and headers["content-type"] == "application/json"


async def test_requests_through_the_application_start_no_thread_for_request_started(remote, alice_key, monkeypatch):
    """Django's handler sends request_started before the middleware; its two
    receivers do nothing on the request's new thread but cost a thread start
    and two switches, so the server drops them (chatapp.asgi). A page's
    middleware block and a /v1 call still run, and request_finished keeps
    giving the request's connections back."""
    from django.core import signals
    from django.db import close_old_connections

    from chatapp import asgi

    # As the server has them: Django's test clients connect close_old_connections again after each request.
    monkeypatch.setattr(signals.request_started, "receivers", list(signals.request_started.receivers))
    asgi.drop_request_started_receivers()
    assert not signals.request_started.has_listeners()
    assert close_old_connections in [ref() for _, ref, *_ in signals.request_finished.receivers]
    hops = thread_hops(monkeypatch)
    status, headers, _ = await get("/accounts/login/")
    assert status == 200 and "content-security-policy" in headers  # the page's middleware block ran
    status, _, _ = await get("/v1/models", [(b"authorization", f"Bearer {alice_key}".encode())])
    assert status == 200
    assert hops and not any("sync_send" in hop for hop in hops), hops


async def post(path: str, body: bytes = b"", headers=()) -> int:
    status, _, _ = await call("POST", path, headers, request_body=body)
    return status


async def test_posts_are_marked_on_their_way_to_the_engines_until_answered(remote, alice_key, monkeypatch):
    """chatapp.asgi marks every POST (a chat's send, an API call) for the
    engines (inference.arrivals), pages and /v1 alike; GETs and streams are
    not marked, and no mark outlives its request."""
    from inference import arrivals

    made = []

    class Recording(arrivals.Arrivals):
        def expect(self, *, bind=True):
            made.append(super().expect(bind=bind))
            return made[-1]

    marks = Recording()
    monkeypatch.setattr(arrivals, "ARRIVALS", marks)
    assert await post("/accounts/login/", b"username=x&password=y",
                      [(b"content-type", b"application/x-www-form-urlencoded")]) in (200, 403)
    assert await post("/v1/chat/completions", b"{", [(b"authorization", f"Bearer {alice_key}".encode()),
                                                       (b"content-type", b"application/json")]) == 400
    assert len(made) == 2 and len(marks) == 0 and all(mark.released for mark in made)
    status, _, _ = await get("/accounts/login/")
    assert status == 200 and len(made) == 2


async def test_a_mark_ends_when_the_response_starts():
    from chatapp.asgi import marked_on_its_way
    from inference import arrivals

    seen = {}

    async def app(scope, receive, send):
        mark = seen["mark"] = arrivals.current()
        seen["before"] = mark in arrivals.ARRIVALS
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen["after"] = mark in arrivals.ARRIVALS
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    await marked_on_its_way(app)({"type": "http", "method": "POST", "path": "/c/new"}, receive, send)
    assert seen["before"] is True and seen["after"] is False


async def test_requests_borrow_a_kept_thread_for_their_sync_work(remote, alice_key, monkeypatch):
    """Django's handler starts a thread for each request's sync work (a
    page's middleware block, closing a /v1 response) and a second one to join
    it; both starts hold the event loop until the new thread runs. The
    product's handlers lend each request a kept thread instead
    (chatapp.asgi.REQUEST_THREADS): once one is kept, pages and API calls
    start none."""
    import threading

    from chatapp.asgi import REQUEST_THREADS

    auth = [(b"authorization", f"Bearer {alice_key}".encode())]
    assert (await get("/accounts/login/"))[0] == 200  # lazily built resources start their threads here
    assert (await get("/v1/models", auth))[0] == 200
    assert REQUEST_THREADS.idle() >= 1
    started = []
    real_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(3):
        status, headers, _ = await get("/accounts/login/")
        assert status == 200 and "content-security-policy" in headers  # the middleware block ran
        assert (await get("/v1/models", auth))[0] == 200
    assert started == []


async def test_requests_in_flight_together_each_have_a_thread_of_their_own():
    """A request keeps one thread for its whole life (its database connection
    and thread-locals are that thread's), as under Django's own handler: two
    at once never share one, and more than the kept number are let go."""
    import threading

    from chatapp.asgi import RequestThreads

    threads = RequestThreads(limit=1)
    first, second = threads.lend(), threads.lend()
    assert first is not second
    idents = {first.submit(threading.get_ident).result(), second.submit(threading.get_ident).result()}
    assert len(idents) == 2
    threads.give_back(first)
    threads.give_back(second)  # over the limit: shut down
    assert threads.idle() == 1 and threads.lend() is first
    with pytest.raises(RuntimeError):
        second.submit(lambda: None)
