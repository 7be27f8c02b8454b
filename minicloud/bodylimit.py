"""Request size limits at the ASGI layer, before Django, authentication or any view reads a byte: a body larger than
its route allows is answered 413 (JSON) as soon as its declared length or the bytes received pass the allowance, and
what was sent is never buffered. Routes that take files (uploads, model and tokenizer imports) allow
``UPLOAD_MAX_BYTES``; every other route ``MAX_BODY_BYTES`` (docs/security.md)."""
from __future__ import annotations

import json
import re

from django.conf import settings
from django.utils.translation import gettext as _

# Routes whose bodies are files: a chunk of a resumable upload, a multipart upload of a dataset, a model or a tokenizer.
UPLOAD_ROUTES = re.compile(r"^/(api/v1/(uploads/[^/]+|datasets|models/import|tokenizers)"
                           r"|datasets/upload/|models/import/|tokenizers/)$")


def too_large(limit: int) -> str:
    """The refusal of a body over ``limit`` bytes (here and in the API's own answer to Django's bound)."""
    return _("request body: larger than the %(mb)s MB this address accepts") % {"mb": format(limit / 2**20, ".4g")}


def allowance(path: str) -> int:
    return settings.UPLOAD_MAX_BYTES if UPLOAD_ROUTES.match(path) else settings.MAX_BODY_BYTES


class BodyLimit:
    """ASGI middleware: ``BodyLimit(app)`` refuses over-large HTTP bodies with a 413 before ``app`` sees them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = allowance(scope.get("path", ""))
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(send, limit)
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:  # a body longer than it said, or sent without a length
                    state["over"] = True
                    return {"type": "http.disconnect"}  # Django stops reading and answers nothing
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, tracked_send)
        if state["over"] and not state["started"]:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int):
        body = json.dumps({"error": too_large(limit), "details": {"limit_bytes": limit}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
