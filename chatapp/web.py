"""Daphne as `serve` runs it, in its own process and in its extra web
processes (WEB_PROCESSES, `manage.py serve_web`).

With one web process Daphne listens through its own endpoint. With several,
each process opens its own socket on the same address with SO_REUSEPORT and
hands it to Daphne's reactor: the kernel deals new connections out among the
sockets (by a hash of the client's address and port), as gunicorn's and
nginx's `reuseport` do. One shared socket would instead go to whichever
process accepts first, and Twisted accepts a whole burst in one go. A
process that is not listening yet (loading moderation's models) has no
socket, so it gets no connection; one that died takes only the connections
it had accepted.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from conversations import turns
from gateway import quotas


def reuse_port_socket(host: str, port: int, *, first: bool) -> socket.socket:
    """A listening TCP socket on host:port that other processes of this user
    may bind too (SO_REUSEPORT, Linux and the BSDs). The `first` one (serve's)
    makes sure the port is free, so that a second server started on it by
    mistake fails as it would without SO_REUSEPORT instead of silently taking
    half its connections; port 0 then picks a free port, which the others bind.
    Raises OSError when the port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if first:
        # Bound without SO_REUSEPORT, it fails where any socket holds the port,
        # with or without the option.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            address = probe.getsockname()
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)  # a burst of connections waits here, not refused
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def start_keepers() -> None:
    """The per-process keepers, on Daphne's loop once the reactor runs: the
    reply keeper (heartbeats, the reaper of dead processes' replies) and the
    quota keeper (renews this process's reservations, gives back those of
    dead processes)."""
    loop = asyncio.get_event_loop()
    loop.call_soon(turns.start_keeper)
    loop.call_soon(quotas.start_keeper)


def run_daphne(host: str, port: int, *, sock: socket.socket | None, on_ready: Callable[[object], None],
               on_reactor: Callable[[object], None]) -> list[tuple[str, int]]:
    """Serve the ASGI application until the reactor stops; returns the
    addresses it listened on (none: it could not listen). `sock`, when given,
    is listened on instead of host:port. `on_reactor(reactor)` runs before
    anything starts (a stop signal needs the reactor), `on_ready(server)`
    once it listens, before the reactor runs."""
    # Imported here, not at the top: daphne.server installs Twisted's asyncio
    # reactor on import, and chatapp.asgi builds the application; neither
    # belongs in a process that only runs `manage.py help`.
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server
    from twisted.internet import reactor

    from chatapp.asgi import application

    def ready():
        if sock is not None:
            # Adopted here rather than through Daphne's "fd:" endpoint, which
            # takes IPv4 sockets only. The reactor holds its own duplicate.
            server.listen_success(reactor.adoptStreamPort(sock.fileno(), sock.family, server.http_factory))
            sock.close()
        start_keepers()
        on_ready(server)

    on_reactor(reactor)
    server = Server(
        application=application,
        endpoints=build_endpoint_description_strings(host=host, port=port),
        # Our handlers, not Twisted's, turn SIGINT/SIGTERM into a reactor stop
        # (serve's second Ctrl-C and its watchdog).
        signal_handlers=False,
        http_timeout=None,  # SSE replies are long-lived by design
        application_close_timeout=10,
        ready_callable=ready,
    )
    if sock is not None:
        server.endpoints = []  # after the constructor, which refuses a server with none: ready() adopts `sock`
    server.run()
    return server.listening_addresses
