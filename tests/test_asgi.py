"""HTTP through the ASGI application as daphne serves it: the middleware chain and a synchronous view run in one
crossing to a request thread that is kept for the next request, one request at a time per process
(minicloud/handler.py)."""
import asyncio
import threading
import time

import pytest
from asgiref import sync
from channels.testing import ApplicationCommunicator, HttpCommunicator
from django.core.signals import request_finished
from django.db import connections
from django.db.backends.signals import connection_created

from minicloud.asgi import application, django_asgi_app
from minicloud.handler import RequestThread, Turns, WebHandler

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.asyncio
async def test_a_request_crosses_to_a_thread_a_few_times_not_once_per_middleware_hook(monkeypatch):
    hops = []
    to_thread, to_loop = sync.SyncToAsync.__call__, sync.AsyncToSync.__call__

    async def counted_to_thread(self, *args, **kwargs):
        hops.append(("thread", getattr(self.func, "__qualname__", repr(self.func))))
        return await to_thread(self, *args, **kwargs)

    def counted_to_loop(self, *args, **kwargs):
        hops.append(("loop", getattr(self.awaitable, "__qualname__", repr(self.awaitable))))
        return to_loop(self, *args, **kwargs)

    monkeypatch.setattr(sync.SyncToAsync, "__call__", counted_to_thread)
    monkeypatch.setattr(sync.AsyncToSync, "__call__", counted_to_loop)
    response = await HttpCommunicator(application, "GET", "/api/v1/health",
                                      headers=[(b"host", b"127.0.0.1")]).get_response()
    assert response["status"] == 200
    # request_started's sync receivers, then the middleware chain with the view in one crossing, then the response's
    # close. With the standard middleware in async mode this was 17 crossings (two per process_request/
    # process_response pair); with Django's async path around our sync chain, 5 (to the thread for the chain, back to
    # the loop to resolve the view, to the thread for it).
    assert [h for h in hops if h[0] == "loop"] == [] and len(hops) <= 3, hops


async def _health():
    communicator = HttpCommunicator(application, "GET", "/api/v1/health", headers=[(b"host", b"127.0.0.1")])
    response = await communicator.get_response()
    await communicator.wait()  # the request's end too (its response closed)
    return response


@pytest.mark.asyncio
async def test_requests_one_after_another_run_in_one_kept_thread_with_its_database_connection(settings):
    """Django's handler started a thread per request, and so opened a database connection per request: a quarter
    of the web processes' time in a burst of submissions. The web processes keep their connections (CONN_MAX_AGE)."""
    settings.DATABASES["default"]["CONN_MAX_AGE"] = None
    threads, opened = [], []

    def finished(**kwargs):
        threads.append(threading.get_ident())

    request_finished.connect(finished)
    connection_created.connect(opened.append)
    try:
        for _ in range(3):
            assert (await _health())["status"] == 200
    finally:
        request_finished.disconnect(finished)
        connection_created.disconnect(opened.append)
        settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
        for thread in django_asgi_app.idle:  # the kept connections, closed in their threads
            thread.submit(connections.close_all).result()
    assert len(threads) == 3 and len(set(threads)) == 1, threads
    assert len(opened) <= 1, opened  # one connection for the three (none if the thread kept one from before)


@pytest.mark.asyncio
async def test_a_process_runs_one_request_at_a_time_until_it_runs_long():
    turns = Turns(running=1, long_after_s=0.2)
    first = await turns.take()
    started = time.monotonic()
    second = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for its turn
    first.end()
    (await second).end()
    assert time.monotonic() - started < 0.15  # as soon as the first ended

    long = await turns.take()  # not ended yet: a long view
    started = time.monotonic()
    after = await asyncio.wait_for(turns.take(), timeout=2)
    assert 0.15 < time.monotonic() - started < 1.0  # it gave its turn back after long_after_s
    after.end()
    long.end()  # ending late gives nothing back twice
    assert turns.slots._value == 1


@pytest.mark.asyncio
async def test_a_slow_clients_body_holds_no_turn():
    """A turn is for running the request's Python: while a client is still sending its body, the process's one turn
    serves the requests that are ready."""
    handler = WebHandler(running=1, long_after_s=30)
    scope = {"type": "http", "method": "POST", "path": "/api/v1/auth/token", "raw_path": b"/api/v1/auth/token",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "scheme": "http", "asgi": {"version": "3.0"}}
    slow = ApplicationCommunicator(handler, scope)
    await slow.send_input({"type": "http.request", "body": b'{"username": "nobody", ', "more_body": True})
    quick = HttpCommunicator(handler, "GET", "/api/v1/health", headers=[(b"host", b"127.0.0.1")])
    assert (await quick.get_response(timeout=10))["status"] == 200
    await slow.send_input({"type": "http.request", "body": b'"password": "wrong"}'})
    assert (await slow.receive_output(timeout=10))["status"] == 401
    await slow.wait(timeout=10)


def test_a_thread_still_running_a_view_is_not_given_to_the_next_request():
    """A client that leaves mid-request leaves its view running in the thread: reusing that thread would make the next
    request wait behind it."""
    handler = WebHandler.__new__(WebHandler)  # just the thread bookkeeping
    handler.idle, handler.idle_limit = [], 2
    gate = threading.Event()
    busy, free = RequestThread(), RequestThread()
    busy.submit(gate.wait)
    free.submit(lambda: None).result()
    assert busy.busy and not free.busy
    handler._done_with(busy)
    handler._done_with(free)
    assert handler.idle == [free]
    gate.set()
    busy.shutdown(wait=True)  # it finished its view, closed its connections and ended
    free.shutdown()


@pytest.mark.asyncio
async def test_pages_and_the_login_redirect_work_through_asgi():
    response = await HttpCommunicator(application, "GET", "/", headers=[(b"host", b"127.0.0.1")]).get_response()
    assert response["status"] == 302 and dict(response["headers"])[b"Location"].startswith(b"/accounts/login/")
    login = await HttpCommunicator(application, "GET", "/accounts/login/",
                                   headers=[(b"host", b"127.0.0.1")]).get_response()
    assert login["status"] == 200 and b'name="csrfmiddlewaretoken"' in login["body"]


def test_the_web_process_freezes_what_exists_once_it_is_ready():
    """minicloud.asgi warms the URL maps, templates and catalogues, then hides those long-lived objects from the
    garbage collector (a full collection of a web process walked ~120,000 objects, ~90 ms with the GIL held)."""
    import gc

    assert gc.get_freeze_count() > 10_000
