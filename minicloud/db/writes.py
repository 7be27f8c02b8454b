"""A write transaction whose statements travel to PostgreSQL together.

Django's ORM waits for the database's answer to each statement before it sends the next: a transaction of three
INSERTs is five round trips (BEGIN, the INSERTs, COMMIT), and on a busy machine each round trip costs a few
milliseconds of waiting for the database's process and then for the caller's to be scheduled again -- not of work
(docs/performance.md, "Fifth pass"). In ``together()`` the transaction runs in psycopg's pipeline mode: a statement is
sent without waiting for its answer, until an answer is needed (the new row's id of a ``create()``), and the COMMIT
goes with the last statements. ``add()`` inserts a row without reading anything back, so it waits for nothing. A
submission's job, its event and its audit entry take three round trips instead of five (BEGIN; the job's INSERT,
whose id the others need; the other two INSERTs with the COMMIT).

On SQLite (a library call, no round trips) both are Django's plain ``transaction.atomic()`` and ``save()``.
"""
from __future__ import annotations

from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections, transaction


@contextmanager
def together(using: str = DEFAULT_DB_ALIAS):
    """``transaction.atomic()``, its statements pipelined on PostgreSQL, the COMMIT sent with the last of them.

    The pipeline opens inside the transaction (around it, each of Django's switches of autocommit would wait for the
    pipeline to drain); psycopg still waits for its BEGIN. An error of a pipelined statement is raised when its
    answer arrives, at the latest as the block ends, and rolls the transaction back as in ``atomic()``; Django's own
    COMMIT then finds the transaction committed and sends nothing, and ``on_commit`` callbacks run as usual. Nested
    in another transaction, on SQLite, or with a libpq older than 14, it is ``atomic()``."""
    conn = connections[using]
    with transaction.atomic(using=using):
        if conn.vendor != "postgresql" or len(conn.atomic_blocks) > 1 or not _has_pipeline():
            yield
            return
        with conn.wrap_database_errors, conn.connection.pipeline():  # an error arriving late is Django's too
            yield
            if not conn.needs_rollback:
                with conn.cursor() as cursor:
                    cursor.execute("COMMIT")


def _has_pipeline() -> bool:
    """libpq 14 or later (psycopg's binary wheel brings its own; a system libpq may be older)."""
    import psycopg

    return psycopg.capabilities.has_pipeline()


def add(obj, using: str = DEFAULT_DB_ALIAS) -> None:
    """INSERT ``obj`` and read nothing back: its id stays unset. ``create()`` asks for the new id (RETURNING), which
    in a pipeline is a round trip of its own. Django's ``QuerySet._insert`` is ``save()``'s own INSERT (field defaults
    and ``auto_now_add`` applied as there); no ``pre_save``/``post_save`` signal is sent, so only rows that have no
    receivers are added this way."""
    meta = type(obj)._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.auto_field and not f.generated]
    type(obj)._base_manager._insert([obj], fields=fields, using=using)
