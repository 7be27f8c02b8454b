"""minicloud/db/writes.py: a write transaction's statements travel to PostgreSQL together, and still all or none."""
import pytest
from django.db import IntegrityError, connection, transaction

from accounts.models import AuditEntry
from jobs.models import Dataset, Job, JobEvent
from minicloud.db.writes import add, together

pytestmark = pytest.mark.django_db(transaction=True)  # a transaction of its own, as in a request


def round_trips(monkeypatch):
    """Each wait of psycopg's connection for the server's data is one round trip (its I/O generators yield
    ``Wait.R`` then)."""
    import psycopg
    from psycopg.waiting import Wait

    calls = []
    real = psycopg.Connection.wait

    def counting(gen):
        try:
            state = next(gen)
            while True:
                if state == Wait.R:
                    calls.append(state)
                state = gen.send((yield state))
        except StopIteration as done:
            return done.value

    monkeypatch.setattr(psycopg.Connection, "wait", lambda self, gen, *a, **kw: real(self, counting(gen), *a, **kw))
    return calls


def new_job(user):
    from models_registry.models import Tokenizer

    return Job(owner=user, name="j", stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain"),
               tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))


def test_a_job_its_event_and_its_audit_entry_in_three_round_trips(user, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("round trips are PostgreSQL's (the PostgreSQL + Redis pass of .ci/run)")
    connection.ensure_connection()
    committed = []
    job = new_job(user)
    calls = round_trips(monkeypatch)
    with together():
        job.save()
        add(JobEvent(job=job, kind="submitted", actor=user.username))
        add(AuditEntry(actor=user, username=user.username, action="submit", object_type="job", object_id=str(job.pk)))
        transaction.on_commit(lambda: committed.append(len(calls)))
    # BEGIN; the job; the rest with the COMMIT (Django's own: five). A wait is only counted when the answer is not
    # there yet, so a fast server may make it fewer.
    assert 1 <= len(calls) <= 3, len(calls)
    assert committed == [len(calls)]  # on_commit callbacks run once committed, as in atomic()
    assert JobEvent.objects.get(job=job).kind == "submitted"
    assert AuditEntry.objects.get(object_id=str(job.pk)).action == "submit"


def test_a_failing_statement_rolls_everything_back(user):
    with pytest.raises(IntegrityError):
        with together():
            job = new_job(user)
            job.save()
            add(JobEvent(job=job, kind="submitted"))
            add(JobEvent(job_id=10**9, kind="submitted"))  # no such job: known at the latest by the COMMIT
    assert not Job.objects.exists() and not JobEvent.objects.exists()
    # the connection is usable afterwards
    with together():
        job = new_job(user)
        job.save()
        add(JobEvent(job=job, kind="submitted"))
    assert JobEvent.objects.filter(job=job).count() == 1


def test_inside_a_transaction_it_is_a_savepoint_of_it(user):
    with transaction.atomic():
        job = new_job(user)
        job.save()
        try:
            with together():
                add(JobEvent(job=job, kind="submitted"))
                raise RuntimeError("undone")
        except RuntimeError:
            pass
    assert Job.objects.filter(pk=job.pk).exists() and not JobEvent.objects.filter(job=job).exists()


def test_without_pipeline_support_it_is_a_plain_transaction(user, monkeypatch):
    """A libpq older than 14 has no pipeline mode: the same rows, in Django's own transaction."""
    from minicloud.db import writes

    monkeypatch.setattr(writes, "_has_pipeline", lambda: False)
    job = new_job(user)
    with together():
        job.save()
        add(JobEvent(job=job, kind="submitted"))
    assert JobEvent.objects.filter(job=job).count() == 1
