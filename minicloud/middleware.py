"""Middleware of our own: one, which keeps Django's middleware chain synchronous under ASGI.

Our pages and API views are synchronous. Under ASGI Django runs a middleware that can be either sync or async in the
mode of the handler inside it, and the innermost handler is async: every standard middleware (all are
``MiddlewareMixin``) then hops to a worker thread and back for each of its ``process_request``/``process_response``
hooks, and WhiteNoise (sync only) hops back again -- 17 thread switches per request, 7-8 ms of a 2-core machine's CPU
before a view starts. A sync-only middleware innermost makes Django build every middleware outside it in sync mode:
the request crosses to a thread once, runs the whole chain there, and the async views (the OpenAI-compatible
streaming endpoint) still run on the event loop inside it.
"""


class SyncMiddlewareChain:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)
