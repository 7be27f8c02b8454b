"""Live job updates over WebSocket.

The database is the source of truth: the streams tail their jobs' metric points, log and status every 0.5 s, so
they work across processes on the SQLite default with no channel layer. One look per web process serves all its
streams (``Watch``: one light query for every watched job's fingerprint), and a stream reads its job in full only
when that changed. With Redis, the supervisor's ``job.update`` push makes it look at once. When the status moves,
the update also carries the job's history; texts come in the page's language (``lang``).
"""
import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import translation

from accounts.access import NotFound, connection_user, readable, readable_ids
from minicloud.errors import int_or_none

from . import selectors
from .models import Job

log = logging.getLogger("jobs")
POLL_S = 0.5
RECHECK_S = 2.0  # how often an open stream checks that its user may still read the job


def still_allowed(streams) -> set:
    """Which of ``streams`` may go on: their connection's credentials still hold (an active account, a token not
    revoked, a session not ended) and its user may still read the job. One check per connection's credentials and
    one query per user, however many streams (accounts.access)."""
    by_credentials = {}
    for stream in streams:
        by_credentials.setdefault(stream.credentials, []).append(stream)
    allowed = set()
    for (user_id, token_digest, _session_key), group in by_credentials.items():
        user = connection_user(user_id, token_digest, group[0].scope.get("session"))
        if user is not None:
            visible = readable_ids(Job, user, {stream.job_id for stream in group})
            allowed.update(stream for stream in group if stream.job_id in visible)
    return allowed


class Watch:
    """One poll for every open job stream of a web process (an event loop): every ``POLL_S`` the fingerprints of all
    the watched jobs in one query (``selectors.job_fingerprints``), and a wake for each stream whose job's
    fingerprint is not the one it last read; every ``RECHECK_S`` whether each stream's user may still read its job,
    for all of them at once (``still_allowed``), closing those who may not (4403). Open job pages used to poll one by
    one, four queries each twice a second and their access every 2 s: a class's idle tabs took most of a core
    (docs/performance.md)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.streams: dict[int, set] = {}
        self.task = None
        self.checked_at = self.loop.time()

    def add(self, stream) -> None:
        self.streams.setdefault(stream.job_id, set()).add(stream)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run())

    def remove(self, stream) -> None:
        streams = self.streams.get(stream.job_id, set())
        streams.discard(stream)
        if not streams:
            self.streams.pop(stream.job_id, None)

    async def run(self):
        while self.streams:
            try:
                prints = await database_sync_to_async(selectors.job_fingerprints)(list(self.streams))
            except Exception:  # the database restarting: every stream of the process waits for it, none is lost
                log.exception("the live updates' look at the database failed; trying again")
                await asyncio.sleep(POLL_S)
                continue
            for job_id, streams in list(self.streams.items()):
                for stream in streams:
                    if stream.seen is not None and stream.seen != prints.get(job_id):  # new, or the job is gone
                        stream.wake.set()
            if self.loop.time() - self.checked_at >= RECHECK_S:
                await self.recheck()
            await asyncio.sleep(POLL_S)

    async def recheck(self):
        self.checked_at = self.loop.time()
        streams = [stream for streams in self.streams.values() for stream in streams]
        try:
            allowed = await database_sync_to_async(still_allowed)(streams)
        except Exception:  # as a failed look: the next tick checks again
            log.exception("the live updates' access check failed; trying again")
            return
        for stream in streams:
            if stream not in allowed:
                self.remove(stream)
                await stream.close(code=4403)  # made private, token revoked, logged out: the stream ends


_watch = None


def watch() -> Watch:
    """This event loop's watch."""
    global _watch
    if _watch is None or _watch.loop is not asyncio.get_running_loop():
        _watch = Watch()
    return _watch


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
        self.seen = None  # the job's fingerprint at the last full read (selectors.job_fingerprints)
        session = self.scope.get("session")
        self.credentials = (user.pk, self.scope.get("token_digest"), session.session_key if session else None)
        self.wake = asyncio.Event()
        self.group = f"job.{self.job_id}"
        if self.channel_layer is not None:
            await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.poller = asyncio.create_task(self.poll())
        watch().add(self)

    async def disconnect(self, code):
        if hasattr(self, "poller"):
            self.poller.cancel()
            watch().remove(self)
        if getattr(self, "group", None) and self.channel_layer is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_update(self, event):
        self.wake.set()

    def read(self, selector, *args):
        """A selector's answer, its texts in the page's language."""
        with translation.override(self.language):
            return selector(self.job_id, *args)

    def read_update(self):
        """(the job's fingerprint, everything new for the stream): the fingerprint first, so that a change during the
        read makes the next look differ."""
        fingerprint = selectors.job_fingerprints([self.job_id]).get(self.job_id)
        if fingerprint is None:
            return None, None
        return fingerprint, self.read(selectors.job_update, self.after, self.log_after)

    async def send_update(self) -> bool:
        """Send what is new; False once the job is gone (the stream is closed)."""
        fingerprint, update = await database_sync_to_async(self.read_update)()
        if fingerprint is None:
            await self.close(code=4404)
            return False
        self.seen = fingerprint
        if update["points"]:
            self.after = update["points"][-1]["seq"]
        self.log_after = update["log_offset"]
        status = update["job"]["status"], update["job"]["step"]
        if update["points"] or update["log"] or status != self.last_status:
            if self.last_status is None or status[0] != self.last_status[0]:  # the history gained an event
                update["events"] = await database_sync_to_async(self.read)(selectors.job_events)
            self.last_status = status
            await self.send_json({"type": "update", **update})
        return True

    async def poll(self):
        """The first update, then one whenever the watch (or the supervisor's push, with Redis) says the job moved
        (the watch also ends the stream once its user may no longer read the job). A read that fails closes the
        stream (1011), and the page connects again from where it was, instead of a stream left open that says
        nothing more."""
        try:
            await self.follow()
        except Exception:
            log.exception("the live updates of job %s stopped", self.job_id)
            await self.close(code=1011)

    async def follow(self):
        if not await self.send_update():
            return
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not await self.send_update():
                return
