"""`manage.py serve_web`: one of `serve`'s extra web processes (WEB_PROCESSES).

Internal: `serve` starts it once its own Daphne listens, and stops it (or
the kernel does, when `serve` dies). It runs Daphne alone, on a socket of
its own bound to serve's port (chatapp.web): no embedded services, no
migrations, no worker, no engines (WEB_PROCESSES needs a relay node), and
moderation's models loaded before it listens, as `serve` loads its own.
"""
from __future__ import annotations

import contextlib
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chatapp import runtime, web
from chatapp.management.commands.serve import _exit_without_waiting_for_stray_threads
from gateway import services as gateway_services

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Command(BaseCommand):
    help = "Internal: one of `serve`'s extra web processes on its port (WEB_PROCESSES); serve starts it."

    def add_arguments(self, parser):
        parser.add_argument("--host", required=True)
        parser.add_argument("--port", type=int, required=True)

    def handle(self, *args, host, port, **options):
        if port <= 0:
            raise CommandError("serve_web binds the port `serve` listens on; --port must name it")
        self._reactor = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        # Stopped while loading: nothing runs yet that needs stopping in order.
        with contextlib.suppress(KeyboardInterrupt):
            if settings.LOAD_MODELS:
                for line in gateway_services.load_stage_models():
                    self.stdout.write(line)
            runtime.freeze_long_lived()
            sock = web.reuse_port_socket(host, port, first=False)
            web.run_daphne(host, port, sock=sock, on_ready=lambda server: None, on_reactor=self._set_reactor)
        # No engines to shut down (WEB_PROCESSES needs a relay node); one that
        # overruns its share of the shutdown is killed by serve.
        _exit_without_waiting_for_stray_threads()

    def _set_reactor(self, reactor):
        self._reactor = reactor

    def _on_stop_signal(self, signum, frame):
        if self._reactor is None:
            raise KeyboardInterrupt  # still loading: nothing to stop in order
        if self._reactor.running:
            self._reactor.callFromThread(self._reactor.stop)
        else:  # between Daphne's set-up and the reactor's start
            self._reactor.callWhenRunning(self._reactor.stop)
