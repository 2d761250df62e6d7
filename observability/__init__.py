"""Observability: Prometheus metrics and structured logs for every process.

Low in the layers (below chatapp.runtime, above the engine) so that the
engine pools, the gateway, the chat and the top-level wiring can all report
through it; it imports none of them. `observability.receivers` (signal
listeners for higher apps) and `observability.apps` sit in the top layer.

- `metrics`: every metric's definition and the one-line helpers other apps call;
- `engine`: the engine pools' per-request histograms and their scrape-time gauges;
- `exposition`: the multiprocess directory and the registry `/metrics` renders;
- `logs`: structlog over the standard library's logging, the request-scoped context;
- `middleware`, `views`: the request id, requests by view and status, `/metrics`.
"""
