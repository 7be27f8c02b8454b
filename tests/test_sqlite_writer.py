"""The SQLite backend queues writers on one lock file (minicloud/db/base.py): a write transaction holds it from BEGIN
to COMMIT or ROLLBACK, an autocommit write for its statement, a read never."""
import fcntl
import os

import pytest
from django.db import connection, transaction

from jobs.models import Node

pytestmark = pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite backend's own lock")


def _free(path) -> bool:
    """Whether another process (another open file) could take the writer lock now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.django_db(transaction=True)
def test_write_transaction_holds_the_writer_lock_until_it_ends():
    Node.objects.count()  # connected
    path = connection.writer_lock.path
    assert path.endswith("-writer.lock") and _free(path)
    with transaction.atomic():
        Node.objects.create(name="n1")
        assert not _free(path)  # a writer elsewhere waits in the kernel, not in SQLite's busy handler
    assert _free(path)
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            Node.objects.create(name="n2")
            raise RuntimeError("rolled back")
    assert _free(path) and not Node.objects.filter(name="n2").exists()
    list(Node.objects.all())  # reads never take it
    assert _free(path)


@pytest.mark.django_db(transaction=True)
def test_autocommit_writes_take_the_writer_lock(monkeypatch):
    from minicloud.db.base import WriterLock

    taken = []
    acquire = WriterLock.acquire
    monkeypatch.setattr(WriterLock, "acquire", lambda self: (taken.append(1), acquire(self)))
    Node.objects.filter(name="none").update(stopping=True)  # an UPDATE outside any transaction
    list(Node.objects.all())
    assert len(taken) == 1 and _free(connection.writer_lock.path)
