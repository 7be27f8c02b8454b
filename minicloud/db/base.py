"""Django's SQLite backend, with every writer queued on one lock file instead of SQLite's busy handler.

SQLite has one writer at a time. A connection that finds the database locked sleeps in SQLite's busy handler and
tries again, after 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms: a writer that has lost a few times naps
for 50-100 ms while others take the lock in between. Ten people submitting jobs at once on two web processes
measured 15 ms median but 850 ms p99 and 1.6 s worst waits for ``BEGIN IMMEDIATE`` (docs/performance.md, "Second
pass"), though the lock was held less than a quarter of the time.

Here each write transaction (``BEGIN IMMEDIATE``, taken by ``transaction.atomic``) and each write statement outside
one (an INSERT, UPDATE or DELETE in autocommit) first takes an exclusive ``flock`` on ``<database>-writer.lock``:
a waiter sleeps in the kernel and wakes the moment the writer before it releases the lock (at COMMIT or ROLLBACK),
in this process or any other of this machine, and the kernel frees it when its process dies. Reads never take it
(WAL lets them run beside the writer). Like a row lock on PostgreSQL, a writer waits for as long as the one before
it holds the database; SQLite's own timeout (20 s) still bounds waits on anything that writes without this backend.
No library does this for Django's SQLite backend (docs/decisions.md).
"""
from __future__ import annotations

import fcntl
import os

from django.db.backends.sqlite3 import base as sqlite

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class WriterLock:
    """One connection's hold on the database's writer lock file (an open file of its own: the lock excludes the
    other connections of this process as well as other processes)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class QueuedCursor(sqlite.SQLiteCursorWrapper):
    """A write statement in autocommit waits for the writer lock first (inside a transaction the lock is held)."""

    writer_lock: WriterLock | None = None

    def execute(self, query, params=None):
        return self._queued(super().execute, query, params)

    def executemany(self, query, param_list):
        return self._queued(super().executemany, query, param_list)

    def _queued(self, run, query, args):
        if self.writer_lock is None or self.connection.in_transaction or not _is_write(query):
            return run(query, args)
        self.writer_lock.acquire()
        try:
            return run(query, args)
        finally:
            self.writer_lock.release()


def _is_write(query: str) -> bool:
    return query.lstrip()[:7].upper().startswith(_WRITES)


class DatabaseWrapper(sqlite.DatabaseWrapper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writer_lock = None

    def get_new_connection(self, conn_params):
        conn = super().get_new_connection(conn_params)
        if not self.is_in_memory_db():
            self.writer_lock = WriterLock(f"{self.settings_dict['NAME']}-writer.lock")
        return conn

    def create_cursor(self, name=None):
        cursor = self.connection.cursor(factory=QueuedCursor)
        cursor.writer_lock = self.writer_lock
        return cursor

    def _start_transaction_under_autocommit(self):
        if self.writer_lock is None:
            return super()._start_transaction_under_autocommit()
        self.writer_lock.acquire()
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self.writer_lock.release()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._release_when_done()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._release_when_done()

    def _close(self):
        try:
            return super()._close()
        finally:
            if self.writer_lock is not None:
                self.writer_lock.close()
                self.writer_lock = None

    def _release_when_done(self):
        if self.writer_lock is not None and (self.connection is None or not self.connection.in_transaction):
            self.writer_lock.release()
