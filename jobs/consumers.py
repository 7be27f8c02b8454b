"""Live job updates over WebSocket.

The database is the source of truth: the consumer tails the job's metric points, log and status every 0.5 s, so it
works across processes on the SQLite default with no channel layer. With Redis, the supervisor's ``job.update``
push makes it look at once. When the status moves, the update also carries the job's history; texts come in the
page's language (``lang``).
"""
import asyncio
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import translation

from accounts.access import NotFound, connection_user, readable
from minicloud.errors import int_or_none

from . import selectors
from .models import Job

POLL_S = 0.5
RECHECK_S = 2.0  # how often an open stream checks that its user may still read the job


class JobConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        try:
            await database_sync_to_async(readable)(Job, user, self.job_id)
        except NotFound:
            await self.close(code=4404)
            return
        qs = parse_qs(self.scope.get("query_string", b"").decode())
        self.after = max(int_or_none((qs.get("after") or ["0"])[0]) or 0, 0)  # "abc" starts from the beginning
        self.log_after = max(int_or_none((qs.get("log_after") or ["0"])[0]) or 0, 0)
        try:  # the page's language (``lang``), for the texts the updates carry (a job's error)
            self.language = translation.get_supported_language_variant((qs.get("lang") or [""])[0])
        except LookupError:
            self.language = settings.LANGUAGE_CODE
        self.last_status = None
        self.user_id = user.pk
        self.checked_at = asyncio.get_running_loop().time()
        self.wake = asyncio.Event()
        self.group = f"job.{self.job_id}"
        if self.channel_layer is not None:
            await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.poller = asyncio.create_task(self.poll())

    async def disconnect(self, code):
        if hasattr(self, "poller"):
            self.poller.cancel()
        if getattr(self, "group", None) and self.channel_layer is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_update(self, event):
        self.wake.set()

    def read(self, selector, *args):
        """A selector's answer, its texts in the page's language."""
        with translation.override(self.language):
            return selector(self.job_id, *args)

    def still_allowed(self) -> bool:
        """The connection's credentials still hold and its user may still read the job (accounts.access)."""
        user = connection_user(self.user_id, self.scope.get("token_digest"), self.scope.get("session"))
        if user is None:
            return False
        try:
            readable(Job, user, self.job_id)
        except NotFound:
            return False
        return True

    async def poll(self):
        while True:
            now = asyncio.get_running_loop().time()
            if now - self.checked_at >= RECHECK_S:
                self.checked_at = now
                if not await database_sync_to_async(self.still_allowed)():
                    await self.close(code=4403)  # made private, token revoked, logged out: the stream ends
                    return
            update = await database_sync_to_async(self.read)(selectors.job_update, self.after, self.log_after)
            if update["points"]:
                self.after = update["points"][-1]["seq"]
            self.log_after = update["log_offset"]
            status = update["job"]["status"], update["job"]["step"]
            if update["points"] or update["log"] or status != self.last_status:
                if self.last_status is None or status[0] != self.last_status[0]:  # the history gained an event
                    update["events"] = await database_sync_to_async(self.read)(selectors.job_events)
                self.last_status = status
                await self.send_json({"type": "update", **update})
            try:
                await asyncio.wait_for(self.wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
