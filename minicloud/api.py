"""Small helpers for the JSON API: bearer-token auth, JSON bodies and JSON errors (never a traceback)."""
from __future__ import annotations

import functools
import json
import logging

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .errors import ServiceError

log = logging.getLogger("minicloud")


class ApiError(Exception):
    def __init__(self, status: int, message: str, details=None):
        super().__init__(message)
        self.status = status
        self.details = details


def error(status: int, message: str, details=None) -> JsonResponse:
    return JsonResponse({"error": message, "details": details}, status=status)


def json_body(request) -> dict:
    if not request.body:
        return {}
    try:
        data = json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _bearer_user(request):
    from accounts.models import ApiToken

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
                return error(405, f"method {request.method} not allowed; use {', '.join(methods)}")
            if auth:
                user = request_user(request)
                if user is None:
                    return error(401, "authentication required: send 'Authorization: Bearer <token>'")
                request.user = user
            try:
                result = view(request, *args, **kwargs)
            except ApiError as exc:
                return error(exc.status, str(exc), exc.details)
            except Exception as exc:  # a bug must still answer in JSON
                if isinstance(exc, ServiceError):
                    details = {**({"field": exc.field} if exc.field else {}), **(exc.details or {})}
                    return error(exc.status, str(exc), details or None)
                log.exception("API error in %s", view.__name__)
                return error(500, "internal error; the server log has the details")
            if isinstance(result, tuple):
                return JsonResponse(result[0], status=result[1], json_dumps_params={"ensure_ascii": False})
            if isinstance(result, dict):
                return JsonResponse(result, json_dumps_params={"ensure_ascii": False})
            return result

        return inner

    return wrap


def int_param(request, name, default=0) -> int:
    raw = request.GET.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: must be an integer, got {raw!r}") from None
    if value < 0:
        raise ApiError(400, f"{name}: must not be negative")
    return value
