"""Requests through the product's deployed ASGI application, as Daphne hands
them over, for tests that need its real handler (thread lending, the API's
own middleware) rather than Django's test clients."""
from __future__ import annotations


async def call(application, method, path, *, headers=(), body=b""):
    """One HTTP request through the deployed ASGI application (Django's test
    clients would keep the request's connection instead of giving it back)."""
    from channels.testing import ApplicationCommunicator

    comm = ApplicationCommunicator(application, {
        "type": "http", "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80)})
    await comm.send_input({"type": "http.request", "body": body})
    start = await comm.receive_output(20)
    content = b""
    while True:
        message = await comm.receive_output(20)
        content += message.get("body", b"")
        if not message.get("more_body"):
            break
    await comm.wait(20)  # the request's end: its pooled connection goes back
    return start["status"], content
