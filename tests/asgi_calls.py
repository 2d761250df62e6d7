"""Requests through the product's deployed ASGI application, as Daphne hands
them over, for tests that need its real handler (thread lending, the API's
own middleware) rather than Django's test clients."""
from __future__ import annotations


async def exchange(application, method, path, *, headers=(), body=b"", scheme="http", timeout_s=20):
    """One HTTP request, read to its last byte and to the handler's end (its
    work after the last byte, such as closing the response and giving back its
    pooled connection); returns (the response's start message, its body)."""
    from channels.testing import ApplicationCommunicator

    comm = ApplicationCommunicator(application, {
        "type": "http", "http_version": "1.1", "method": method, "scheme": scheme, "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80)})
    await comm.send_input({"type": "http.request", "body": body})
    start = await comm.receive_output(timeout_s)
    content = b""
    while True:
        message = await comm.receive_output(timeout_s)
        content += message.get("body", b"")
        if not message.get("more_body"):
            break
    await comm.wait(timeout_s)
    return start, content


async def call(application, method, path, *, headers=(), body=b""):
    """(status, body) of one request (Django's test clients would keep the
    request's connection instead of giving it back)."""
    start, content = await exchange(application, method, path, headers=headers, body=body)
    return start["status"], content
