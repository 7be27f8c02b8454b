"""``/metrics`` for Prometheus, the project's part: the web request latency of every web process and the scrape token
(the portal's state is jobs.services.monitoring's, read from the database at each scrape; jobs.views.metrics answers).

Scrapes authenticate with ``Authorization: Bearer $MINICLOUD_METRICS_TOKEN`` (Prometheus' ``authorization``
setting); with no token set the endpoint is off (404). ``serve`` runs several daphne processes: each records its
requests in prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by serve for its web
children), and whichever process answers a scrape sums them all, so counters never jump between processes.
"""
from __future__ import annotations

import hmac
import os
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

REQUEST_LATENCY = Histogram(
    "minicloud_http_request_duration_seconds", "Time to answer a web request (to the first byte when streamed)",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


def observe(request, response, seconds: float) -> None:
    match = getattr(request, "resolver_match", None)
    route = ("/" + match.route) if match is not None and match.route else "unmatched"
    REQUEST_LATENCY.labels(request.method, route, f"{response.status_code // 100}xx").observe(seconds)


class RecordLatency:
    """Outermost middleware: every request's time into ``REQUEST_LATENCY`` (the route pattern, not the path, as the
    label: one series per URL pattern whatever the ids)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        if request.path != "/metrics":
            observe(request, response, time.perf_counter() - start)
        return response


def latency_exposition() -> bytes:
    """The request latency histogram, summed over the web processes when serve runs several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def chat_worker_stats(timeout: float = 2.0) -> dict | None:
    """The turns at this node's generation worker (``{"running", "waiting", "held", "generating", "models",
    "model_loads"}``: training/chat_worker.py ``Worker.stats``); None as ``tell_chat_worker`` says."""
    return tell_chat_worker({"stats": True}, "stats", timeout)


def tell_chat_worker(msg: dict, until: str, timeout: float = 2.0):
    """Send ``msg`` to this node's generation worker on a connection of its own, then read its lines until one holds
    ``until`` (``"stats"``: its answer; ``"ready"``: its greeting, sent before it reads the connection, so that a line
    is not lost with a connection closed first): that line's value. None where this process has no node worker to ask
    (not started by ``serve``) or it does not answer within ``timeout`` (it answers between two decoding steps)."""
    import json
    import socket

    from django.conf import settings

    if not settings.CHAT_SOCKET:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect("\0" + settings.CHAT_SOCKET)
            lines = sock.makefile("rwb")
            lines.write(json.dumps(msg).encode() + b"\n")
            lines.flush()
            while line := lines.readline():
                answer = json.loads(line)
                if until in answer:
                    return answer[until]
    except (OSError, ValueError):
        pass
    return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect("\0" + settings.CHAT_SOCKET)
            lines = sock.makefile("rwb")
            lines.write(b'{"stats": true}\n')
            lines.flush()
            while line := lines.readline():
                msg = json.loads(line)
                if "stats" in msg:
                    return msg["stats"]
    except (OSError, ValueError):
        pass
    return None


def refused_scrape(request):
    """None when the request carries the scrape token; else the answer it gets (404: metrics off, 401)."""
    from django.conf import settings
    from django.http import HttpResponse

    token = settings.METRICS_TOKEN
    if not token:
        return HttpResponse("metrics are off: set MINICLOUD_METRICS_TOKEN (docs/deploy.md)\n", status=404,
                            content_type="text/plain")
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if hmac.compare_digest(given.encode(), token.encode()):
        return None
    response = HttpResponse("a scrape token is needed: Authorization: Bearer <MINICLOUD_METRICS_TOKEN>\n",
                            status=401, content_type="text/plain")
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response
