"""Middleware of our own: one that refuses NUL characters in a request's fields, and one that keeps Django's middleware
chain synchronous under ASGI.

Our pages and API views are synchronous. Under ASGI Django runs a middleware that can be either sync or async in the
mode of the handler inside it, and the innermost handler is async: every standard middleware (all are
``MiddlewareMixin``) then hops to a worker thread and back for each of its ``process_request``/``process_response``
hooks, and WhiteNoise (sync only) hops back again -- 17 thread switches per request, 7-8 ms of a 2-core machine's CPU
before a view starts. A sync-only middleware innermost makes Django build every middleware outside it in sync mode:
the request crosses to a thread once, runs the whole chain there, and the async views (the OpenAI-compatible
streaming endpoint) still run on the event loop inside it.
"""


class RefuseNulCharacters:
    """A NUL character (``\\x00``) in the path, a query parameter or a form field is refused with a 400 before any view
    runs: no database stores one (PostgreSQL refuses it in text, which would surface as a 500 from whatever field a
    view saves), and no person types one. Django's form fields refuse it too, but not every view reads a form. JSON
    bodies are checked by ``minicloud.api.json_object``; uploaded files and raw chunks are not text and pass."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.core.exceptions import BadRequest

        fields = list(request.GET.lists())
        if request.method == "POST":
            fields += list(request.POST.lists())
        if "\x00" in request.path or any("\x00" in k or any("\x00" in v for v in values) for k, values in fields):
            from django.utils.translation import gettext as _

            message = _("text may not contain NUL characters (\\u0000)")
            if request.path.startswith(("/api/", "/v1/")):
                from .api import error

                return error(400, message)
            raise BadRequest(message)
        return self.get_response(request)


class SyncMiddlewareChain:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)
