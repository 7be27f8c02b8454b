"""Django's ASGI handler for our web processes: request threads kept (with their database connections), one crossing
to the thread per request, and one request running at a time per process unless it runs long.

Measured under a burst of submissions (docs/performance.md, "Fourth pass"), three things of Django's ASGI handler cost
the web processes most of their time beside the views themselves:

- **A new thread and a new database connection per request.** Django enters a new
  ``asgiref.sync.ThreadSensitiveContext`` per request, which starts a thread for it and joins it at the end, and
  Django's database connections are per thread: every request opened a connection (on SQLite: a file, the WAL
  pragmas, some thirty SQL functions registered) and closed it. A py-spy profile put a quarter of the web processes'
  samples there. Here each request still has one thread for all its synchronous parts (asgiref's thread-sensitive
  contract), but the thread comes from a stack of idle ones (``ThreadSensitiveContext(executor=...)``, asgiref's own
  way to choose it) and goes back afterwards; with persistent connections (``CONN_MAX_AGE``, set for serve's web
  processes in settings) it keeps its connection, checked before each request (``CONN_HEALTH_CHECKS``).
- **Three round trips between the event loop and the thread.** With a synchronous middleware chain around an async
  core, Django's async path crosses to the thread for the chain, back to the loop to resolve the view, and to the
  thread again for the view. A synchronous view's request here crosses once: the chain and the view run in the thread
  as under WSGI (``BaseHandler.get_response``). Async views (the OpenAI-compatible streaming endpoint) keep the async
  path, so their responses still stream.
- **Every request at once, in one interpreter.** A process runs Python in one thread at a time (the GIL): ten requests
  in flight in one process finish no sooner in all than one after another, but each takes ten times as long -- and a
  request holding SQLite's one writer lock held it for 6-8 ms instead of 1.5, while every writer of every process
  waited behind it. Here a process runs one request at a time (``running``), the others waiting their turn on the
  event loop in arrival order, as a WSGI server's synchronous worker does. A turn covers the middleware chain and the
  view, not the reading of the request's body nor the sending of its response (a slow client holds none), and unlike
  such a worker, a request that has run for ``long_after_s`` no longer holds its turn: a long view never holds up the
  requests behind it for more than that. ``settings.WEB_PROCESSES`` runs one process more than the cores, so a core
  is not left idle while one process's request waits for the database.

When no thread is idle a new one is started, as Django would, and a thread still running the view of a request whose
client left is not reused (``RequestThread.busy``). At most ``idle`` threads are kept; one beyond that closes its
database connections and ends.
"""
from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.db import connections
from django.urls import Resolver404, resolve


class RequestThread(ThreadPoolExecutor):
    """One request thread. ``busy``: a call handed to it has not finished -- a request whose client went away leaves
    its view running in the thread (asgiref stops waiting for it, the thread cannot be stopped); such a thread is
    not given to the next request, which would wait behind it. One worker runs calls in order, so the last call
    done means every call done."""

    def __init__(self):
        super().__init__(max_workers=1, thread_name_prefix="request")
        self.last = None

    def submit(self, fn, /, *args, **kwargs):
        self.last = super().submit(fn, *args, **kwargs)
        return self.last

    @property
    def busy(self) -> bool:
        return self.last is not None and not self.last.done()


class Turns:
    """At most ``running`` requests hold a turn at once; the others wait for one in arrival order (asyncio's
    semaphore is first come, first served). A request gives its turn back when it ends, or once it has held it for
    ``long_after_s``, whichever comes first."""

    def __init__(self, running: int, long_after_s: float):
        self.slots = asyncio.Semaphore(running)
        self.long_after_s = long_after_s

    async def take(self):
        await self.slots.acquire()
        turn = _Turn(self.slots)
        turn.timer = asyncio.get_running_loop().call_later(self.long_after_s, turn.give_back)
        return turn


class _Turn:
    def __init__(self, slots: asyncio.Semaphore):
        self.slots = slots
        self.held = True
        self.timer = None

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()

    def end(self) -> None:  # once or more
        self.timer.cancel()
        self.give_back()


class WebHandler(ASGIHandler):
    def __init__(self, running: int = 1, long_after_s: float = 0.1, idle: int = 16):
        super().__init__()
        self.turns = Turns(running, long_after_s)
        self.idle_limit = idle
        self.idle: list[RequestThread] = []  # last in, first out: the most recently used thread is warmest
        self.sync_handler = BaseHandler()  # the same middleware, built as under WSGI
        self.sync_handler.load_middleware(is_async=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        thread = self.idle.pop() if self.idle else RequestThread()
        _turn.set(None)
        try:
            async with ThreadSensitiveContext(executor=thread):
                await self.handle(scope, receive, send)
        finally:
            _end_turn()  # a request refused before its view (a bad request) ends its turn here
            self._done_with(thread)

    def _done_with(self, thread: RequestThread) -> None:
        if not thread.busy and len(self.idle) < self.idle_limit:
            self.idle.append(thread)
        else:  # still busy, or one more than is kept: its connections closed in that thread (they are per thread) once
            # it is done, then it ends
            thread.submit(connections.close_all)
            thread.shutdown(wait=False)

    async def read_body(self, receive):
        """The request's body, then its turn: what follows (the request's signals and object, the middleware chain
        and the view) runs in the turn, up to ``get_response_async``'s end."""
        body = await super().read_body(receive)
        _turn.set(await self.turns.take())
        return body

    async def get_response_async(self, request):
        """A synchronous view's request crosses to its thread once, for the middleware chain and the view; the turn
        ends with them (the response is sent after it)."""
        try:
            if _async_view(request.path_info):
                return await super().get_response_async(request)
            return await sync_to_async(self.sync_handler.get_response, thread_sensitive=True)(request)
        finally:
            _end_turn()


# The request's turn, taken once its body is read and ended when its view returns (the view runs in a task of its own,
# which copies this context).
_turn: contextvars.ContextVar[_Turn | None] = contextvars.ContextVar("turn", default=None)


def _end_turn() -> None:
    turn = _turn.get()
    if turn is not None:
        turn.end()


def _async_view(path: str) -> bool:
    try:
        return iscoroutinefunction(resolve(path).func)
    except Resolver404:
        return False
