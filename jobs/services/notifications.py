"""Telling a job's owner when it succeeds, fails, is paused for quota or waits too long: e-mail through Django's mail
settings and HMAC-signed JSON webhooks, each made once per event and channel (a unique row), sent off the job's own
path (a queued task and the minute housekeeping) and retried with backoff while the receiver fails."""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import urllib.error
import urllib.request

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone, translation
from django.utils.translation import gettext as _, gettext_noop

from ..models import NOTIFY_EVENTS, Integrations, Job, MetricPoint, Notification

# Seconds before each retry; a notification that failed this many times is given up (status failed).
BACKOFF_S = (30, 120, 600, 1800, 7200, 21600)
SEND_TIMEOUT_S = 10
LEASE_S = 120  # a sender's claim on a notification: another node's housekeeping leaves it alone meanwhile
SUBJECTS = {
    "succeeded": gettext_noop("[MiniCloud] job #%(id)s %(name)s succeeded"),
    "failed": gettext_noop("[MiniCloud] job #%(id)s %(name)s failed"),
    "paused_quota": gettext_noop("[MiniCloud] job #%(id)s %(name)s is paused: quota used up"),
    "waiting": gettext_noop("[MiniCloud] job #%(id)s %(name)s has waited %(minutes)s minutes in the queue"),
}


def wanted_events(job: Job, prefs: Integrations) -> list[str]:
    return list(job.notify) if job.notify is not None else list(prefs.events)


def final_metrics(job: Job) -> dict:
    """The last value of each metric the job logged (its model's metrics when it made one)."""
    if job.output_model_id and job.output_model.metrics:
        return dict(job.output_model.metrics)
    out: dict = {}
    for values in MetricPoint.objects.filter(job=job).order_by("-seq").values_list("values", flat=True)[:50]:
        for k, v in values.items():
            out.setdefault(k, v)
    return out


def payload(job: Job, event: str) -> dict:
    waited = int((timezone.now() - job.created_at).total_seconds() // 60)
    return {"event": event, **({"waited_minutes": waited} if event == "waiting" else {}), "time": timezone.now().isoformat(),
            "job": {"id": job.pk, "name": job.name, "stage": job.stage, "status": job.status,
                    "owner": job.owner.username if job.owner else None, "step": job.step,
                    "total_steps": job.total_steps, "error": job.error_text if job.error else "",
                    "created_at": job.created_at.isoformat(),
                    "finished_at": job.finished_at.isoformat() if job.finished_at else None,
                    "model": job.output_model_id},
            "metrics": final_metrics(job), "url": f"{settings.PUBLIC_URL}/jobs/{job.pk}/"}


def job_event(job: Job, event: str) -> list[Notification]:
    """Record the notifications ``event`` of ``job`` calls for (once each) and queue their sending; returns the new
    ones. Never raises into the caller's path: a job's state change does not depend on its notifications."""
    if event not in NOTIFY_EVENTS or job.owner_id is None:
        return []
    prefs = Integrations.objects.filter(user_id=job.owner_id).first()
    if prefs is None or event not in wanted_events(job, prefs):
        return []
    with in_owners_language(prefs):  # the error's text, as the owner reads the portal
        body = payload(job, event)
    channels = []
    if prefs.email_enabled and (prefs.email or job.owner.email):
        channels.append(("email", prefs.email or job.owner.email))
    if prefs.webhook_url:
        channels.append(("webhook", prefs.webhook_url))
    made = []
    for channel, target in channels:
        try:
            with transaction.atomic():
                made.append(Notification.objects.create(job=job, event=event, channel=channel, target=target,
                                                        payload=body))
        except IntegrityError:  # this event was already told on this channel
            continue
    if made:
        transaction.on_commit(_queue_delivery)
    return made


def _queue_delivery():
    from .queue import node_task

    try:
        node_task("jobs.tasks.deliver_notifications", task_name=f"notify-{timezone.now().timestamp()}")
    except Exception:  # noqa: BLE001 -- the housekeeping sends them within a minute anyway
        pass


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def in_owners_language(prefs: Integrations | None):
    """Translations in the owner's language: the one they last switched the portal to or saved their notification
    settings in (else the site's default)."""
    return translation.override((prefs.language if prefs else "") or settings.LANGUAGE_CODE)


def _send(n: Notification) -> None:
    """One attempt; raises on any failure."""
    prefs = Integrations.objects.filter(user_id=n.job.owner_id).first()
    if n.channel == "email":
        with in_owners_language(prefs):
            _send_mail(n)
        return
    body = json.dumps(n.payload, ensure_ascii=False).encode()
    req = urllib.request.Request(n.target, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "MiniCloud-Webhook/1", "X-MiniCloud-Event": n.event,
        "X-MiniCloud-Delivery": str(n.pk), "X-MiniCloud-Signature": sign(prefs.secret("webhook_secret") if prefs
                                                                          else "", body)})
    with urllib.request.urlopen(req, timeout=SEND_TIMEOUT_S) as resp:
        if not 200 <= resp.status < 300:
            raise OSError(f"HTTP {resp.status}")


def _send_mail(n: Notification) -> None:
    from django.core.mail import send_mail

    job = n.payload["job"]
    subject = _(SUBJECTS[n.event]) % {"id": job["id"], "name": job["name"],
                                      "minutes": n.payload.get("waited_minutes", "")}
    lines = [subject, "", f"{_('Stage')}: {job['stage']}", f"{_('Status')}: {job['status']}",
             f"{_('Step')}: {job['step']}/{job['total_steps']}"]
    if job["error"]:
        lines.append(f"{_('Error')}: {job['error']}")
    lines += [f"{k}: {v}" for k, v in sorted(n.payload["metrics"].items())]
    lines += ["", n.payload["url"]]
    send_mail(subject, "\n".join(lines), None, [n.target], fail_silently=False)


def deliver_due(now: datetime.datetime | None = None) -> dict:
    """Send every pending notification that is due; each is claimed first (a conditional update), so nodes running
    this at once never send one twice. Returns counts."""
    now = now or timezone.now()
    counts = {"sent": 0, "retry": 0, "failed": 0}
    due = Notification.objects.filter(status=Notification.Status.PENDING, next_attempt_at__lte=now)
    for n in due.select_related("job", "job__owner")[:200]:
        lease = now + datetime.timedelta(seconds=LEASE_S)
        if not Notification.objects.filter(pk=n.pk, status=Notification.Status.PENDING,
                                           next_attempt_at=n.next_attempt_at).update(next_attempt_at=lease):
            continue  # another sender has it
        try:
            _send(n)
        except Exception as exc:  # noqa: BLE001 -- a receiver's failure is recorded and retried
            attempts = n.attempts + 1
            given_up = attempts >= len(BACKOFF_S)
            Notification.objects.filter(pk=n.pk).update(
                attempts=attempts, last_error=str(exc)[:1000] or type(exc).__name__,
                status=Notification.Status.FAILED if given_up else Notification.Status.PENDING,
                next_attempt_at=now + datetime.timedelta(seconds=BACKOFF_S[min(attempts, len(BACKOFF_S)) - 1]))
            counts["failed" if given_up else "retry"] += 1
        else:
            Notification.objects.filter(pk=n.pk).update(status=Notification.Status.SENT, sent_at=timezone.now(),
                                                        attempts=n.attempts + 1, last_error="")
            counts["sent"] += 1
    return counts


def check_waits(now: datetime.datetime | None = None) -> int:
    """Queued jobs that have waited longer than their owner's ``wait_minutes``: a "waiting" notification each (once
    per job: the unique row)."""
    now = now or timezone.now()
    made = 0
    for prefs in Integrations.objects.filter(Q(email_enabled=True) | ~Q(webhook_url="")).select_related("user"):
        cutoff = now - datetime.timedelta(minutes=prefs.wait_minutes)
        waiting = (Job.objects.filter(owner=prefs.user, status=Job.S.QUEUED, created_at__lte=cutoff)
                   .exclude(notifications__event="waiting"))
        for job in waiting[:100]:
            made += len(job_event(job, "waiting"))
    return made


def _offered(language: str) -> bool:
    """Whether ``language`` (a request's LANGUAGE_CODE) is one the portal offers, and so one to write in."""
    return language in dict(settings.LANGUAGES)


def remember_language(user, language: str) -> None:
    """The language a user switched the portal to: their notifications are written in it from now on (the settings
    row is not made for it: without one there is nothing to send)."""
    if _offered(language):
        Integrations.objects.filter(user=user).exclude(language=language).update(language=language)


def update_integrations(user, *, email_enabled: bool, email: str, webhook_url: str, events: list[str],
                        wait_minutes: int, new_webhook_secret: bool = False, wandb_key: str = "",
                        swanlab_key: str = "", clear: tuple[str, ...] = (), language: str = "") -> Integrations:
    """Save a user's notification and tracker settings. A key left blank keeps the stored one; ``clear`` names the
    keys to forget. A webhook gets a signing secret when it first has a URL (or when asked for a new one).
    ``language``: the one the settings page was shown in, which the notifications are then written in."""
    import secrets as random

    prefs = Integrations.of(user)
    prefs.email_enabled, prefs.email, prefs.webhook_url = email_enabled, email, webhook_url
    prefs.events, prefs.wait_minutes = [e for e in NOTIFY_EVENTS if e in events], wait_minutes
    if _offered(language):
        prefs.language = language
    if webhook_url and (new_webhook_secret or not prefs.secret("webhook_secret")):
        prefs.set_secret("webhook_secret", random.token_urlsafe(32))
    for name, value in (("wandb_key", wandb_key), ("swanlab_key", swanlab_key)):
        if name in clear:
            setattr(prefs, name, "")
        elif value:
            prefs.set_secret(name, value.strip())
    prefs.save()
    return prefs
