"""WebSocket auth for API clients: ``Authorization: Bearer <token>`` or ``?token=`` when there is no session user."""
from urllib.parse import parse_qs

from channels.db import database_sync_to_async

from accounts.models import ApiToken, hash_token


@database_sync_to_async
def _user_for(raw):
    return ApiToken.user_for(raw)


class TokenAuthMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        if user is None or not user.is_authenticated:
            raw = None
            for name, value in scope.get("headers", []):
                if name == b"authorization" and value.lower().startswith(b"bearer "):
                    raw = value[7:].decode().strip()
            if raw is None:
                raw = (parse_qs(scope.get("query_string", b"").decode()).get("token") or [None])[0]
            if raw:
                found = await _user_for(raw)
                if found is not None:  # the digest: a live connection re-checks that the token still exists
                    scope = dict(scope, user=found, token_digest=hash_token(raw))
        return await self.app(scope, receive, send)
