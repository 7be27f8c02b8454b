"""Small helpers for the JSON API: bearer-token auth, JSON bodies and JSON errors (never a traceback)."""
from __future__ import annotations

import functools
import json
import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponse, JsonResponse
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt

from accounts.models import ApiToken

from .bodylimit import too_large
from .errors import ServiceError, int_or_none, strict_loads

log = logging.getLogger("minicloud")


class ApiError(Exception):
    def __init__(self, status: int, message: str, details=None):
        super().__init__(message)
        self.status = status
        self.details = details


def error(status: int, message: str, details=None) -> JsonResponse:
    return JsonResponse({"error": message, "details": details}, status=status)


_DJANGO_JSON = DjangoJSONEncoder()


def json_response(data, status: int = 200) -> HttpResponse:
    """``data`` as a JSON response, encoded by orjson: a 200-job listing spent a quarter of its time in the standard
    library's encoder. Text stays UTF-8 (not \\u-escaped), as ``JsonResponse(..., ensure_ascii=False)`` wrote it; what
    orjson does not know (lazy translations, Decimal) and datetimes go through Django's own encoder, so every value
    reads as before; ``orjson.Fragment`` values (stored JSON text, see ``jobs.selectors.jobs_listed``) are written as
    they are. A value orjson cannot take at all (an integer beyond 64 bits) falls back to the standard encoder."""
    import orjson

    try:
        body = orjson.dumps(data, default=_DJANGO_JSON.default,
                            option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME)
    except TypeError:  # orjson.JSONEncodeError
        body = json.dumps(data, cls=DjangoJSONEncoder, ensure_ascii=False).encode()
    return HttpResponse(body, status=status, content_type="application/json")


def json_body(request) -> dict:
    """The request's JSON object body ({} when empty). A form body (whose stream the middleware already read for
    its fields) is refused with a 415 naming what to send."""
    if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ServiceError(_("request body: send a JSON object (Content-Type: application/json)"), status=415)
    return json_object(request.body) if request.body else {}


def json_object(raw: bytes) -> dict:
    """A request body that must be one JSON object; a ServiceError (400) saying what is wrong with it otherwise."""
    try:
        data = strict_loads(raw)
        nul = _has_nul(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity, nesting too deep (strict_loads)
        raise ServiceError(_("request body is not valid JSON: %(error)s") % {"error": exc}) from None
    if not isinstance(data, dict):
        raise ServiceError(_("request body must be a JSON object"))
    if nul:  # no database stores it (PostgreSQL refuses it in text)
        raise ServiceError(_("request body: text may not contain NUL characters (\\u0000)"))
    return data


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _bearer_user(request):
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        return None
    return ApiToken.user_for(header[7:].strip())


def _csrf_ok(request) -> bool:
    """Django's CSRF check for a session-authenticated write (the API views themselves are CSRF-exempt)."""
    from django.middleware.csrf import CsrfViewMiddleware

    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is None


def request_user(request):
    """The caller: a valid bearer token, else the page session (GET, or writes that carry its CSRF token); a sent
    but bad token never falls back to the session. None when neither."""
    user = _bearer_user(request)
    if user is None and "Authorization" not in request.headers and request.user.is_authenticated and (
            request.method == "GET" or _csrf_ok(request)):
        user = request.user  # the pages' own calls
    return user


def endpoint(*methods, auth=True):
    """Decorate an API view: method check, auth (Bearer token; a logged-in session for GET, and for writes that
    carry its CSRF token), errors."""

    def wrap(view):
        @csrf_exempt
        @functools.wraps(view)
        def inner(request, *args, **kwargs):
            if request.method not in methods:
                return error(405, _("method %(method)s not allowed; use %(allowed)s")
                             % {"method": request.method, "allowed": ", ".join(methods)})
            if auth:
                user = request_user(request)
                if user is None:
                    return error(401, _("authentication required: send 'Authorization: Bearer <token>'"))
                request.user = user
            try:
                result = view(request, *args, **kwargs)
            except ApiError as exc:
                return error(exc.status, str(exc), exc.details)
            except RequestDataTooBig:  # Django's own bound on a body it reads into memory
                return error(413, too_large(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))
            except SuspiciousOperation as exc:  # too many fields, a malformed multipart body
                return error(400, _("bad request: %(error)s") % {"error": exc})
            except Exception as exc:  # a bug must still answer in JSON
                if isinstance(exc, ServiceError):
                    details = {**({"field": exc.field} if exc.field else {}), **(exc.details or {})}
                    return error(exc.status, str(exc), details or None)
                log.exception("API error in %s", view.__name__)
                return error(500, _("internal error; the server log has the details"))
            if isinstance(result, tuple):
                return json_response(result[0], status=result[1])
            if isinstance(result, dict):
                return json_response(result)
            return result

        return inner

    return wrap


def int_param(request, name, default=0) -> int:
    raw = request.GET.get(name, "")
    if raw == "":
        return default
    value = int_or_none(raw)
    if value is None:
        raise ApiError(400, _("%(name)s: must be an integer, got %(value)s") % {"name": name, "value": repr(raw)})
    if value < 0:
        raise ApiError(400, _("%(name)s: must not be negative") % {"name": name})
    return value


PAGE_LIMIT = 500  # rows per page of a listing, at most (and by default)


def page_limit(request) -> int:
    """A listing's ``?limit=``: 1 to PAGE_LIMIT (the default)."""
    limit = int_param(request, "limit", PAGE_LIMIT)
    if not 1 <= limit <= PAGE_LIMIT:
        raise ApiError(400, _("limit: from 1 to %(max)s") % {"max": PAGE_LIMIT}, {"field": "limit"})
    return limit


def next_page(request, **changes) -> str:
    """The address of this request with ``changes`` to its query (the next page of a listing)."""
    query = request.GET.copy()
    for key, value in changes.items():
        query[key] = value
    return f"{request.path}?{query.urlencode()}"


def offset_page(request, rows) -> tuple[list, str | None]:
    """A page of the queryset ``rows`` in its own order, ties broken by id so that pages neither repeat nor skip a
    row (``?limit=``, ``?offset=``), and the address of the page after it (None on the last page)."""
    limit, offset = page_limit(request), int_param(request, "offset", 0)
    rows = rows.order_by(*(rows.query.order_by or rows.model._meta.ordering), "pk")
    page = list(rows[offset:offset + limit + 1])
    more = len(page) > limit
    return page[:limit], next_page(request, offset=offset + limit) if more else None
